"""Env steps per second of PPO training in the ego env, rollouts and updates together. Prints JSON.

``--policy gmm_ego``: ``trafficgym train ppo --policy gmm_ego``'s loop (defaults: 16 scenes per rollout, 2 epochs
x 2 minibatches) for ``--iterations`` rollouts, timed from the end of the first (set-up and the first map
encodings excluded). ``--policy mlp``: SB3's PPO with the CLI's defaults (16 envs, n_steps 256) for ``--steps`` env
steps. No validation in either.

    python benchmarks/ppo_throughput.py --policy gmm_ego --traffic idm [--iterations 4]
    python benchmarks/ppo_throughput.py --policy mlp --traffic log [--steps 16384]
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import torch
from common import data_parser  # benchmarks/common.py (the script's folder is on sys.path)


def main() -> None:
    parser = data_parser(__doc__, split=False)
    parser.add_argument("--policy", default="gmm_ego", help="gmm_ego or mlp")
    parser.add_argument("--traffic", default="idm", help="log, idm or smart")
    parser.add_argument("--iterations", type=int, default=4, help="gmm_ego: rollouts (the first is not timed)")
    parser.add_argument("--steps", type=int, default=16384, help="mlp: env steps")
    parser.add_argument("--init", default="towns-gmm-catk", help="gmm_ego: the weights to start from")
    args = parser.parse_args()
    data = {"dataset": args.dataset, "data_dir": args.data_dir}
    out = tempfile.mkdtemp(prefix="ppo_throughput_")
    if args.policy == "gmm_ego":
        from training.ppo import GmmPpoConfig, train_gmm_ppo
        from training.trainer import Callback

        cfg = GmmPpoConfig(iterations=args.iterations, traffic=args.traffic)
        marks: list[tuple[float, float]] = []  # (time, env steps) at the end of each rollout's updates

        class Clock(Callback):
            def on_step_end(self, trainer, out):
                if trainer.step % (cfg.epochs * cfg.minibatches) == 0:
                    marks.append((time.perf_counter(), out["env_steps"]))

        train_gmm_ppo(out, cfg, init=args.init, data=data, progress=False, validate=False, callbacks=[Clock()])
        (t0, s0), (t1, s1) = marks[0], marks[-1]
        result = {"env_steps": int(s1 - s0), "wall_s": round(t1 - t0, 1),
                  "env_steps_per_s": round((s1 - s0) / (t1 - t0), 1), "iterations_timed": len(marks) - 1,
                  "s_per_iteration": round((t1 - t0) / max(len(marks) - 1, 1), 2), "config": cfg.to_json()}
    elif args.policy == "mlp":
        from envs.observation import ObsConfig
        from training.sb3_ppo import PpoMlpConfig, train_ppo_mlp

        cfg = PpoMlpConfig(total_steps=args.steps, traffic=args.traffic, eval_every=10**12, eval_scenes=1,
                           collision_penalty=-20.0, offroad_penalty=-20.0,
                           obs=ObsConfig(flat=True, normalize=True, num_map_chunks=8, num_agents=8))
        start = time.perf_counter()
        train_ppo_mlp(out, cfg, data=data, progress=False)
        wall = time.perf_counter() - start
        result = {"env_steps": args.steps, "wall_s": round(wall, 1), "env_steps_per_s": round(args.steps / wall, 1),
                  "note": "includes set-up and one final 1-scene validation"}
    else:
        from envs.errors import UnknownNameError

        raise UnknownNameError("policy", args.policy, ("gmm_ego", "mlp"))
    print(json.dumps({"benchmark": "ppo_throughput", "policy": args.policy, "traffic": args.traffic, **result,
                      "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads "
                                 f"{torch.get_num_threads()}"}, indent=1))


if __name__ == "__main__":
    main()
