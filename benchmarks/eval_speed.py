"""Episode-metric throughput: scenes per second for the full realism + BLM set (metric time only).

Rollouts: R perturbed copies of a towns val scene's log (random smooth lateral/longitudinal drifts over the
future steps), ~50 evaluated agents per scene (the densest scenes; agents of a second scene on the same map are
added to reach the target count), completed to the WOSAC protocol (every agent present at every future step).
Each of ``--repeats`` timed passes scores fresh ``Rollouts`` objects (nothing memoised carries over); the median
pass is reported. Prints one JSON object.

    python benchmarks/eval_speed.py [--rollouts 32] [--agents 50] [--scenes 8] [--threads 2] [--repeats 5] [--profile]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from envs.data import open_dataset
from envs.metrics.episode import compute_episode_metrics, episode_metric_names, rollouts_from_log
from envs.types import Scene
from training.rollouts import complete_rollouts

METRICS = ("realism", "min_ade", "blm_safety", "blm_jsd", "blm_fdd")


def dense_scene(ds, index: int, agents: int, pool: list[int]) -> Scene:
    """Scene ``index`` with agents of other scenes on its map appended until it has ``agents`` agents that are
    valid at step 10 (a timing fixture; the merged agents may overlap the originals)."""
    from dataclasses import replace

    s = ds[index]
    parts = [s]
    for j in pool:
        if sum(int(p.valid[:, 10].sum()) for p in parts) >= agents:
            break
        o = ds[j]
        if j != index and o.map_id == s.map_id and o.num_steps == s.num_steps:
            parts.append(o)
    traj = np.concatenate([p.trajectory for p in parts])
    valid = np.concatenate([p.valid for p in parts])
    live = np.flatnonzero(valid[:, 10])[:agents]
    ids = np.concatenate([[f"{k}:{i}" for i in p.agent_ids] for k, p in enumerate(parts)])
    pick = lambda name: np.concatenate([getattr(p, name) for p in parts])[live]  # noqa: E731
    return replace(s, agent_ids=ids[live], agent_type=pick("agent_type"), extent=pick("extent"),
                   trajectory=traj[live], valid=valid[live], ego_index=-1)


def perturbed(scene: Scene, rollouts: int, history: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(R, A, T, 5)`` log copies whose future drifts by a random constant lateral/longitudinal acceleration."""
    t = np.clip(np.arange(scene.num_steps) - (history - 1), 0, None) * scene.dt  # s since the current step
    sim = np.repeat(scene.trajectory[None], rollouts, axis=0).astype(np.float32)
    a = rng.normal(0.0, 0.5, size=(rollouts, scene.num_agents, 1, 2))  # m/s^2 in x, y
    sim[..., :2] += 0.5 * a * t[None, None, :, None] ** 2
    sim[..., 3:5] += a * t[None, None, :, None]
    valid = np.repeat(scene.valid[None], rollouts, axis=0)
    sim[~valid] = 0
    sim, valid = complete_rollouts(torch.from_numpy(sim), torch.from_numpy(valid), history - 1, scene.dt)
    return sim.numpy(), valid.numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rollouts", type=int, default=32)
    p.add_argument("--agents", type=int, default=50)
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the scenes; the median is reported")
    p.add_argument("--profile", action="store_true", help="print the torch profiler's top ops instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = open_dataset("towns", "val")
    counts = np.array([int(ds[i].valid[:, 10].sum()) for i in range(len(ds))])
    order = [int(i) for i in np.argsort(-counts)]
    rng = np.random.default_rng(0)
    inputs = []
    for i in order[:args.scenes]:
        scene = dense_scene(ds, i, args.agents, order)
        inputs.append((scene, *perturbed(scene, args.rollouts, 11, rng)))

    def fresh_batch() -> list:  # new Rollouts objects: nothing memoised from an earlier pass
        return [rollouts_from_log(scene, args.rollouts, 11, ds.map_index(scene.map_id), sim=sim, sim_valid=valid)
                for scene, sim, valid in inputs]

    batch = fresh_batch()
    episode_metric_names()  # import the families outside the timing
    compute_episode_metrics(rollouts_from_log(ds[order[-1]], args.rollouts, 11, ds.map_index(ds[order[-1]].map_id)),
                            METRICS)  # warm-up
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for r in batch:
                compute_episode_metrics(r, METRICS)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    passes = []  # scenes/s of each pass over the scenes
    for _ in range(args.repeats):
        batch = fresh_batch()
        start = time.perf_counter()
        for r in batch:
            compute_episode_metrics(r, METRICS)
        passes.append(len(batch) / (time.perf_counter() - start))
    print(json.dumps({
        "benchmark": "eval_speed", "metrics": list(METRICS), "scenes": len(batch), "rollouts": args.rollouts,
        "future_steps": batch[0].num_steps - batch[0].history_steps,
        "agents_per_scene": float(np.mean([r.num_agents for r in batch])),
        "context_agents_per_scene": float(np.mean([0 if r.context is None else r.context.shape[0] for r in batch])),
        "threads": torch.get_num_threads(), "passes": [round(x, 2) for x in passes],
        "scenes_per_s": round(float(np.median(passes)), 2), "target_scenes_per_s": 20,
    }))


if __name__ == "__main__":
    main()
