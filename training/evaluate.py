"""Closed-loop evaluation: R rollouts per scene (WOSAC: 32), every episode metric (realism likelihoods and
meta-metrics, minADE, BLM's safety / diversity set, ego planning metrics), averaged over scenes; scenes are
sharded over processes under torchrun with results identical to one process.
"""

from __future__ import annotations

import time

import torch


def evaluate(agent_name: str, ds, *, num_rollouts: int = 32, setting: str = "sim_agents", traffic: str = "log",
             num_scenes: int | None = None, seed: int = 0, checkpoint: str | None = None,
             traffic_checkpoint: str | None = None, agent_config: dict | None = None, metrics=None,
             save_dir: str | None = None, progress_bar: bool = False, start_step: int = 10) -> dict | None:
    """Roll ``agent_name`` out ``num_rollouts`` times on each of the first ``num_scenes`` scenes of ``ds`` and
    compute the episode metrics. Returns ``{"agent", "setting", "scenes", "rollouts", "metrics": means over
    scenes, "per_scene": [...]}`` on rank 0 (None on other ranks). Scene i uses seed ``seed + i`` whichever
    rank runs it, so sharding does not change the result."""
    import math

    from agents.registry import make_agent
    from envs.metrics.episode import check_metrics, compute_episode_metrics
    from training.distributed import gather_to_rank0, init_from_env, shard
    from training.rollouts import save_rollouts, simulate_scene

    metrics = check_metrics(metrics, num_rollouts)  # before any rollout, not after all of them
    rank, world = init_from_env()
    count = len(ds) if num_scenes is None else min(num_scenes, len(ds))
    agent = make_agent(agent_name, checkpoint=checkpoint, **(agent_config or {}))
    other = None if traffic == "log" else make_agent(traffic, checkpoint=traffic_checkpoint)
    mine = shard(range(count), rank, world)
    if progress_bar and rank == 0:
        from tqdm import tqdm

        mine = tqdm(mine, desc=f"eval {agent_name} ({num_rollouts} rollouts)", unit="scene")
    rows = []
    for i in mine:
        start = time.perf_counter()
        rollouts = simulate_scene(agent, ds, i, num_rollouts, setting, other, start_step=start_step, seed=seed + i)
        if save_dir is not None:
            save_rollouts(rollouts, save_dir)
        middle = time.perf_counter()
        with torch.inference_mode():
            values = compute_episode_metrics(rollouts, metrics)
        rows.append({"scene_index": i, "scene_id": rollouts.scene_id, **{k: float(v) for k, v in values.items()},
                     "_rollout_s": middle - start, "_metrics_s": time.perf_counter() - middle})
    gathered = gather_to_rank0(rows, rank, world)
    if gathered is None:
        return None
    per_scene = sorted((r for part in gathered for r in part), key=lambda r: r["scene_index"])
    timing = {"rollout_s_per_scene": sum(r.pop("_rollout_s") for r in per_scene) / max(len(per_scene), 1),
              "metrics_s_per_scene": sum(r.pop("_metrics_s") for r in per_scene) / max(len(per_scene), 1)}
    keys = [k for k in per_scene[0] if k not in ("scene_index", "scene_id")] if per_scene else []
    means = {}
    for k in keys:
        finite = [r[k] for r in per_scene if k in r and math.isfinite(r[k])]
        means[k] = sum(finite) / len(finite) if finite else float("nan")
    return {"agent": agent_name, "dataset": ds.dataset, "split": ds.split, "setting": setting, "traffic": traffic,
            "scenes": count, "rollouts": num_rollouts, "metrics": means, "timing": timing, "per_scene": per_scene}


def format_metric_table(results: list[dict]) -> str:
    """Metrics as rows, agents as columns (means over scenes)."""
    keys = list(dict.fromkeys(k for r in results for k in r["metrics"]))
    width = max([len(k) for k in keys] + [6]) + 2
    header = f"{'metric':<{width}}" + "".join(f"{r['agent']:>18}" for r in results)
    lines = [header, "-" * len(header)]
    for k in keys:
        lines.append(f"{k:<{width}}" + "".join(f"{r['metrics'].get(k, float('nan')):>18.4f}" for r in results))
    return "\n".join(lines)
