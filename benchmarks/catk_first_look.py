"""CAT-K fine-tuning, a first look: the bundled BC weights fine-tuned on the first N towns *train* scenes by each
rollout mode, and closed-loop minADE / realism (2024) of smart sampling (top_k 48) on the same scenes before and
after. Not a result table (train scenes, no choices on val): a quick check that CAT-K moves the policy the right
way and top-k rollouts the wrong way. Prints one JSON object.

    python benchmarks/catk_first_look.py [--modes catk,topk] [--scenes 8] [--steps 30] [--lr 1e-4] [--rollouts 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from agents.smart import SmartAgent
from envs.data import open_dataset
from envs.metrics.episode import compute_episode_metrics
from training.catk import train_catk
from training.rollouts import simulate_scene


def evaluate(model, ds, scenes: int, rollouts: int) -> dict:
    agent = SmartAgent(model.eval(), top_k=48)
    out = []
    for i in range(scenes):
        m = compute_episode_metrics(simulate_scene(agent, ds, i, rollouts, seed=100 + i), ["min_ade", "realism"])
        out.append((m["min_ade"], m["realism_meta_wosac2024"]))
    ade, meta = np.mean(out, axis=0)
    return {"min_ade": round(float(ade), 4), "realism_meta_wosac2024": round(float(meta), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="catk,topk")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--out", default="/tmp/catk_first_look")
    args = p.parse_args()
    torch.set_num_threads(2)
    ds = open_dataset("towns", "train")
    result = {"benchmark": "catk_first_look", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "scenes": args.scenes, "steps": args.steps, "lr": args.lr,
              "init": evaluate(SmartAgent.from_checkpoint("towns-nano").model, ds, args.scenes, args.rollouts)}
    for mode in args.modes.split(","):
        start = time.perf_counter()
        model, history = train_catk(SmartAgent.from_checkpoint("towns-nano").model, ds, f"{args.out}/{mode}",
                                    max_steps=args.steps, batch_size=4, lr=args.lr, scenes=args.scenes, rollout=mode,
                                    progress=False, ckpt_every=0)
        result[mode] = {**evaluate(model, ds, args.scenes, args.rollouts),
                        "train_s": round(time.perf_counter() - start, 1),
                        "final_loss": round(float(np.mean([h["loss"] for h in history[-5:]])), 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
