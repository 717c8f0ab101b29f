"""Where the tokenized policy leaves the road: the bundled BC weights drive every agent of 24 towns *val* scenes
spread over the split (8 rollouts each); vehicle off-road steps are counted by future step, by agent, for
agents entering after the start and for steps after the agent's log ends. Also the map reach of the model's
map->agent attention: the distance of the k-th nearest map piece (k = 16, 32) from every agent at the current
step of every 8th val scene. Prints one JSON object.

    python benchmarks/offroad_drift.py [--checkpoint towns-nano]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from agents.nn.map_pieces import cached_map_pieces
from agents.registry import make_agent
from envs.data.scene_cache import open_dataset
from envs.metrics.features import scene_features
from envs.types import AgentType
from training.rollouts import simulate_scene


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="towns-nano")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ds = open_dataset(split="val")
    agent = make_agent("smart", checkpoint=args.checkpoint)
    rows = []
    for i in np.linspace(0, len(ds) - 1, 24).astype(int):
        r = simulate_scene(agent, ds, int(i), 8, seed=1)
        sf = scene_features(r)
        off = sf.sim["offroad"].valid & sf.sim["offroad"].value
        lv = r.log_valid[:, r.history_steps:]
        first = torch.argmax(r.log_valid.int(), dim=1)
        for a in range(r.num_agents):
            v = sf.sim_valid[:, a]
            if not v.any() or int(r.agent_type[a]) != int(AgentType.VEHICLE):
                continue
            rows.append(dict(late=int(first[a]) > 0, steps=int(v.sum()), off=int(off[:, a].sum()),
                             after_log=int((off[:, a] & ~lv[a][None]).sum()), by_t=off[:, a].sum(0).numpy()))
    worst = sorted(rows, key=lambda x: -x["off"])[:15]
    reach = {16: [], 32: []}
    for i in range(0, len(ds), 8):
        s = ds[i]
        pos = cached_map_pieces(s.map)["pose"][:, :2]
        xy = s.trajectory[:, 10, :2][s.valid[:, 10]]
        d = np.sort(np.linalg.norm(xy[:, None] - pos[None], axis=-1), axis=1)
        for k in reach:
            reach[k].append(d[:, k - 1])
    by_t = np.sum([x["by_t"] for x in rows], axis=0).astype(int)
    print(json.dumps({
        "checkpoint": args.checkpoint, "vehicle_steps": sum(x["steps"] for x in rows),
        "offroad_steps": sum(x["off"] for x in rows),
        "offroad_steps_agents_entering_late": sum(x["off"] for x in rows if x["late"]),
        "offroad_steps_after_log_ends": sum(x["after_log"] for x in rows),
        "offroad_steps_first_and_last_future_step": [int(by_t[0]), int(by_t[-1])],
        "worst15_offroad_fraction_range": [round(min(x["off"] / x["steps"] for x in worst), 3),
                                           round(max(x["off"] / x["steps"] for x in worst), 3)],
        "kth_nearest_map_piece_median_m": {k: round(float(np.median(np.concatenate(v))), 1)
                                           for k, v in reach.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
