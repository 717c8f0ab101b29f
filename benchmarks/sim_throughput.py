"""Simulator throughput. Prints JSON.

(a) the batched core: B scenes x up to A agents, all controlled (bicycle), with collision + off-road + progress
    computed every step: agent-steps per second (agents counted = live agents, not padding);
(b) the single ``trafficgym/Ego-v0`` env through the Gymnasium API with observations and reward: steps/s;
(c) ``reset`` latency of that env (scene load from the warm cache + state build + first observation);
(d) the native vector env (``gym.make_vec(..., vectorization_mode="vector_entry_point")``): env-steps/s.

    python benchmarks/sim_throughput.py [--dataset towns --split val --batch 64 --steps 80]
"""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
import torch
from common import data_parser  # benchmarks/common.py (the script's folder is on sys.path)


def core_throughput(ds, batch: int, steps: int, max_agents: int) -> dict:
    from envs import sim
    from envs.dynamics import InvertibleBicycle
    from envs.metrics import compute_step_metrics
    from envs.types import Action

    scenes = [ds[i] for i in range(min(batch, len(ds)))]
    while len(scenes) < batch:
        scenes = scenes + scenes[: batch - len(scenes)]
    scenes = [s for s in scenes if s.num_agents <= max_agents][:batch]
    dyn = InvertibleBicycle()
    state = sim.reset(scenes, start_step=10, controlled="all")
    # Realistic actions: the logged ones (inverse dynamics), so agents stay on the road.
    actions = dyn.inverse(state.log[:, :, :-1], state.log[:, :, 1:], state.dt)  # (B, A, T-1, 2)
    names = ["collision", "offroad", "progress"]
    for _ in range(3):  # warm-up
        compute_step_metrics(state, names)
    state = sim.reset(scenes, start_step=10, controlled="all")
    live = 0
    start = time.perf_counter()
    for _ in range(steps):
        a = Action(actions[torch.arange(len(scenes)), :, state.t], state.controlled)
        state = sim.step(state, a, dyn)
        compute_step_metrics(state, names)
        live += int((state.current_valid & state.agent_mask).sum())
    elapsed = time.perf_counter() - start
    return {"batch": len(scenes), "agents_padded": state.num_agents, "steps": steps,
            "agent_steps_per_s": round(live / elapsed), "ms_per_step": round(1e3 * elapsed / steps, 3)}


def env_throughput(kwargs: dict, episodes: int) -> dict:
    import gymnasium as gym

    import envs  # noqa: F401

    env = gym.make("trafficgym/Ego-v0", **kwargs).unwrapped
    env.reset(seed=0)
    action = np.zeros(env.action_space.shape, np.float32)
    resets, steps = [], 0
    start = time.perf_counter()
    for ep in range(episodes):
        t0 = time.perf_counter()
        env.reset(seed=ep)
        resets.append(time.perf_counter() - t0)
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
            steps += 1
    elapsed = time.perf_counter() - start - sum(resets)
    return {"steps_per_s": round(steps / elapsed, 1), "steps": steps,
            "reset_ms_mean": round(1e3 * float(np.mean(resets)), 2),
            "reset_ms_p95": round(1e3 * float(np.percentile(resets, 95)), 2)}


def vector_throughput(kwargs: dict, num_envs: int, steps: int = 200) -> dict:
    import gymnasium as gym

    import envs  # noqa: F401

    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                        action_bounds="clip", **kwargs)
    venv.reset(seed=0)
    action = np.zeros((num_envs, 2), np.float32)
    for _ in range(5):
        venv.step(action)
    start = time.perf_counter()
    for _ in range(steps):
        venv.step(action)
    return {"num_envs": num_envs, "env_steps_per_s": round(num_envs * steps / (time.perf_counter() - start))}


def main() -> None:
    parser = data_parser(__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-agents", type=int, default=64)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--episodes", type=int, default=10)
    args = parser.parse_args()

    from envs.data import open_dataset

    ds = open_dataset(args.dataset, args.split, data_dir=args.data_dir)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                         f"({torch.get_num_threads()} threads)", "dataset": f"{args.dataset}/{args.split}"}
    result["core"] = core_throughput(ds, args.batch, args.steps, args.max_agents)
    result["ego_env"] = env_throughput({"dataset": args.dataset, "split": args.split, "data_dir": args.data_dir},
                                       args.episodes)
    result["vector_env"] = [vector_throughput({"dataset": args.dataset, "split": args.split,
                                               "data_dir": args.data_dir}, n) for n in (16, 64)]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
