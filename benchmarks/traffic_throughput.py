"""Cost of reactive traffic. Prints JSON.

core: agent-steps per second of the batched core when every agent is driven by a policy (64 scenes x up to
64 agents), compared with log replay;
env: env-steps per second of the 64-scene ``trafficgym/Ego-v0`` vector env with log-replay vs IDM traffic
(observations, metrics, rewards and autoresets included) — what reactive traffic costs an RL user.

    python benchmarks/traffic_throughput.py [--dataset towns --split val --batch 64 --steps 80]
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch
from common import data_parser  # benchmarks/common.py (the script's folder is on sys.path)


@torch.inference_mode()
def throughput(ds, agent_name: str, batch: int, steps: int) -> dict:
    from agents.registry import make_agent
    from envs import sim

    scenes = [ds[i % len(ds)] for i in range(batch)]
    agent = make_agent(agent_name)
    state = sim.reset(scenes, start_step=10, controlled="all")
    start = time.perf_counter()
    agent.reset(state, state.controlled, seed=0)
    reset_s = time.perf_counter() - start
    live, start = 0, time.perf_counter()
    for _ in range(min(steps, int((state.end - state.t).min()))):
        state = sim.step(state, agent(state, state.controlled), agent.dynamics)
        live += int((state.controlled & state.current_valid & state.agent_mask).sum())
    elapsed = time.perf_counter() - start
    return {"agent_steps_per_s": round(live / elapsed), "ms_per_step": round(1e3 * elapsed / steps, 2),
            "agent_reset_s": round(reset_s, 3)}


def env_throughput(traffic: str, kwargs: dict, num_envs: int = 64, steps: int = 100) -> int:
    from sim_throughput import vector_throughput  # the sibling benchmark script (benchmarks/ is on sys.path)

    return vector_throughput({**kwargs, "traffic": traffic}, num_envs, steps)["env_steps_per_s"]


def main() -> None:
    parser = data_parser(__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--agents", nargs="+", default=["log_replay", "constant_velocity", "idm"])
    args = parser.parse_args()

    from envs.data import open_dataset

    ds = open_dataset(args.dataset, args.split, data_dir=args.data_dir)
    throughput(ds, args.agents[0], 4, 5)  # warm-up (imports, lazy caches)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "dataset": f"{args.dataset}/{args.split}", "batch": args.batch}
    for name in args.agents:
        result[name] = throughput(ds, name, args.batch, args.steps)
    if "log_replay" in result:
        base = result["log_replay"]["agent_steps_per_s"]
        for name in args.agents:
            result[name]["relative_to_log_replay"] = round(result[name]["agent_steps_per_s"] / base, 3)
    kwargs = {"dataset": args.dataset, "split": args.split, "data_dir": args.data_dir}
    env = {name: env_throughput(name, kwargs) for name in ("log", "idm")}
    result["env_steps_per_s"] = {**env, "idm_relative_to_log": round(env["idm"] / env["log"], 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
