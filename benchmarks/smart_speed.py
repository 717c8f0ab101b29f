"""Tokenized policy speed: behaviour-cloning throughput (targets, i.e. agent-tokens, per second, as
``trafficgym train bc`` batches them: 4 scenes of one map per step), CAT-K fine-tuning throughput (scenes and
targets per second as ``trafficgym train catk`` runs: each step a batched closed-loop rollout of 4 scenes, then
one teacher-forced step; with --checkpoint) and the cost of closed-loop 8 s rollouts of one towns val scene
(R = 1 and R = 32 copies, every agent driven), for a model size. Prints JSON.

    python benchmarks/smart_speed.py [--size nano] [--checkpoint towns-nano|FILE] [--vocab FILE] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def catk_throughput(checkpoint: str, train, steps: int, scenes: int) -> dict:
    """``train_catk`` from ``checkpoint`` on the first ``scenes`` train scenes; the steps after 3 warm-up steps
    are timed (rollout + teacher-forced step, as the trainer takes them)."""
    from agents.smart import SmartAgent
    from training.catk import train_catk
    from training.trainer import Callback

    class Clock(Callback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, trainer, out):
            self.marks.append((time.perf_counter(), out["targets"]))

    clock = Clock()
    train_catk(SmartAgent.from_checkpoint(checkpoint).model, train, "/tmp/smart_speed_catk", max_steps=steps + 3,
               scenes=scenes, progress=False, ckpt_every=0, callbacks=[clock])
    (t0, _), (t1, _) = clock.marks[2], clock.marks[-1]
    targets = sum(n for _, n in clock.marks[3:])
    return {"scenes_per_s": round(4 * steps / (t1 - t0), 2), "targets_per_s": round(targets / (t1 - t0)),
            "s_per_step_4_scenes": round((t1 - t0) / steps, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="nano")
    p.add_argument("--checkpoint", default="towns-nano", help="rollouts with these weights ('' : a fresh model)")
    p.add_argument("--vocab", default=None, help="vocabulary file (default: the checkpoint's, else built from 64 "
                                                 "train scenes)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--scenes", type=int, default=64, help="train scenes the timed batches are drawn from")
    args = p.parse_args()

    from agents.smart import SmartAgent, SmartConfig, SmartModel
    from envs.data import open_dataset
    from training.bc import _map_of, build_samples
    from training.bc_data import collate
    from training.rollouts import simulate_scene
    from training.trainer import SampleBatches, TrainConfig, Trainer
    from training.vocab import build_motion_vocabulary, load_vocabulary

    train, val = open_dataset("towns", "train"), open_dataset("towns", "val")
    agent = SmartAgent.from_checkpoint(args.checkpoint) if args.checkpoint else None
    if args.vocab:
        vocab = load_vocabulary(args.vocab)
    elif agent is not None:
        from agents.smart.tokenizer import MotionVocabulary

        vocab = MotionVocabulary({n: agent.model.vocab(n) for n in agent.model.types}, agent.model.tol)
    else:
        vocab = build_motion_vocabulary([train[i] for i in range(64)], max_segments=50_000)
    cfg = SmartConfig.of_size(args.size, {k: len(v) for k, v in vocab.poses.items()})
    model = SmartModel(cfg, vocab)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "threads": torch.get_num_threads(), "size": args.size,
              "params": sum(x.numel() for x in model.parameters())}

    samples = build_samples(train, vocab, cfg, args.scenes, progress=False)
    trainer = Trainer(model, SampleBatches(samples, collate, 4, group_fn=_map_of),
                      TrainConfig(out="/tmp/smart_speed", max_steps=args.steps + 3, batch_size=4, progress=False),
                      save_fn=lambda m: ("smart", {}))
    for _ in range(3):  # warm-up
        trainer.train_step(trainer.next_batch())
    start, targets = time.perf_counter(), 0.0
    for _ in range(args.steps):
        targets += trainer.train_step(trainer.next_batch())["targets"]
    elapsed = time.perf_counter() - start
    result["train"] = {"targets_per_s": round(targets / elapsed), "s_per_step_4_scenes": round(elapsed / args.steps, 3)}

    if agent is not None:
        result["catk"] = catk_throughput(args.checkpoint, train, args.steps, args.scenes)

    agent = agent or SmartAgent(model.eval())
    simulate_scene(agent, val, 0, 1)  # warm-up (imports, lazy caches)
    result["rollout_8s"] = {"scene": val[0].scene_id, "agents": int(val[0].valid[:, 10].sum()),
                            "checkpoint": args.checkpoint or "fresh"}
    for r in (1, 32):
        start = time.perf_counter()
        simulate_scene(agent, val, 0, r, seed=1)
        result["rollout_8s"][f"R={r}_s"] = round(time.perf_counter() - start, 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
