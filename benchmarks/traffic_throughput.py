"""Cost of reactive traffic. Prints JSON.

core: agent-steps per second of the batched core when every agent is driven by a policy (64 scenes x up to
64 agents), compared with log replay;
env: what reactive traffic costs an RL user, at 16 and 64 scenes of the ``trafficgym/Ego-v0`` vector env with
log-replay vs IDM traffic: env-steps per second (observations, metrics, rewards and autoresets included) and the
time of a reset of every env, on scenes not seen before (``cold``) and on the same scenes again (``warm``, as
an RL run revisits its training scenes; IDM memoises its paths).

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


def env_costs(traffic: str, kwargs: dict, num_envs: int, steps: int = 100, resets: int = 5) -> dict:
    import gymnasium as gym
    from sim_throughput import vector_throughput  # the sibling benchmark script (benchmarks/ is on sys.path)

    import envs  # noqa: F401

    rate = vector_throughput({**kwargs, "traffic": traffic}, num_envs, steps)["env_steps_per_s"]
    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                        traffic=traffic, **kwargs)
    total = len(venv.unwrapped.engine.scene_indices)
    batches = [[(k * num_envs + i) % total for i in range(num_envs)] for k in range(resets)]
    venv.reset(seed=0, options={"scene_index": [(resets * num_envs + i) % total for i in range(num_envs)]})
    times = {}
    for kind in ("cold", "warm"):  # the same scene batches twice: first visits, then revisits
        start = time.perf_counter()
        for batch in batches:
            venv.reset(options={"scene_index": batch})
        times[kind] = 1e3 * (time.perf_counter() - start) / resets
    return {"env_steps_per_s": rate, "reset_ms_cold": round(times["cold"], 1), "reset_ms_warm": round(times["warm"], 1)}


def main() -> None:
    parser = data_parser(__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--agents", nargs="+", default=["log_replay", "constant_velocity", "idm"])
    args = parser.parse_args()

    from envs.data import open_dataset

    ds = open_dataset(args.dataset, args.split, data_dir=args.data_dir)
    throughput(ds, args.agents[0], 4, 5)  # warm-up (imports, lazy caches)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                         f"({torch.get_num_threads()} threads)",
              "dataset": f"{args.dataset}/{args.split}", "batch": args.batch}
    for name in args.agents:
        result[name] = throughput(ds, name, args.batch, args.steps)
    if "log_replay" in result:
        base = result["log_replay"]["agent_steps_per_s"]
        for name in args.agents:
            result[name]["relative_to_log_replay"] = round(result[name]["agent_steps_per_s"] / base, 3)
    kwargs = {"dataset": args.dataset, "split": args.split, "data_dir": args.data_dir}
    result["env"] = {}
    for n in (16, 64):
        env = {name: env_costs(name, kwargs, n) for name in ("log", "idm")}
        env["idm_cost_relative_to_log"] = {
            "step": round(env["log"]["env_steps_per_s"] / env["idm"]["env_steps_per_s"], 2),
            **{f"reset_{k}": round(env["idm"][f"reset_ms_{k}"] / env["log"][f"reset_ms_{k}"], 2)
               for k in ("cold", "warm")}}
        result["env"][f"{n}_envs"] = env
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
