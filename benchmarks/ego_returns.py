"""Reference returns of the ego env: one episode per scene for each driver. Prints JSON.

What an RL user compares a policy with: ``zero`` (action 0: keep speed, go straight), ``random`` (uniform over
the normalised action space), ``idm`` and ``log_replay`` as the ego (through ``AgentPolicy``: what the log's
human did, in the env's bicycle actions), and any registered agent with its weights (``--driver NAME[:CKPT]``,
e.g. ``ppo_mlp:towns-ppo-mlp``). Default env: ``trafficgym/Ego-v0`` with its default reward and terminations,
flat normalised observations (the drivers here do not read them, except observation policies).

    python benchmarks/ego_returns.py [--split val --traffic log --scenes 0 --driver zero --driver idm ...]
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch
from common import data_parser  # benchmarks/common.py (the script's folder is on sys.path)

DEFAULT_DRIVERS = ("zero", "random", "idm", "log_replay")


def main() -> None:
    parser = data_parser(__doc__)
    parser.add_argument("--traffic", default="log", help="log, idm or smart")
    parser.add_argument("--scenes", type=int, default=0, help="scenes spread over the split (0: all)")
    parser.add_argument("--driver", action="append", default=None,
                        help=f"repeatable; NAME or NAME:CHECKPOINT (default: {', '.join(DEFAULT_DRIVERS)})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from envs.observation import ObsConfig
    from training.ego_episodes import REFERENCE_DRIVERS, ego_episodes, summarize

    traffic = args.traffic
    if traffic == "smart":
        from agents.registry import make_agent

        traffic = make_agent("smart", checkpoint="towns-nano")
    env = dict(dataset=args.dataset, split=args.split, data_dir=args.data_dir, traffic=traffic,
               obs=ObsConfig(flat=True, normalize=True))
    rows = []
    for spec in args.driver or DEFAULT_DRIVERS:
        name, _, ckpt = spec.partition(":")
        driver = name
        if name not in REFERENCE_DRIVERS and ckpt:
            from agents.registry import make_agent

            driver = make_agent(name, checkpoint=ckpt)
        start = time.perf_counter()
        stats = summarize(ego_episodes(driver, scenes=args.scenes or None, seed=args.seed, **env))
        rows.append({"driver": spec, **{k: round(v, 4) for k, v in stats.items()},
                     "wall_s": round(time.perf_counter() - start, 1)})
    print(json.dumps({"dataset": args.dataset, "split": args.split, "traffic": args.traffic, "drivers": rows,
                      "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads "
                                 f"{torch.get_num_threads()}"}, indent=1))


if __name__ == "__main__":
    main()
