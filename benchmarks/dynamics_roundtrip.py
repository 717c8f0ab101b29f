"""How well each dynamics model reproduces logged motion: forward(inverse(log)). Prints JSON.

one_step: from every logged state, apply the inverse action and compare with the next logged state.
open_loop: from the state at step 10, apply the inverse actions of the log for 80 steps without correction
(errors accumulate; this is what a BC policy that predicted the logged actions perfectly would see).

    python benchmarks/dynamics_roundtrip.py [--dataset towns --split val --scenes 64]
"""

from __future__ import annotations

import json

import torch
from common import data_parser  # benchmarks/common.py (the script's folder is on sys.path)

from envs.dynamics import DYNAMICS
from envs.geometry import wrap_angle


def measure(dataset: str, split: str, num_scenes: int, data_dir=None) -> dict:
    from envs.data import open_dataset

    ds = open_dataset(dataset, split, data_dir=data_dir)
    scenes = [ds[i] for i in range(min(num_scenes, len(ds)))]
    out = {"dataset": f"{dataset}/{split}", "scenes": len(scenes)}
    for name, cls in DYNAMICS.items():
        dyn = cls()
        step_pos, step_head, open_pos = [], [], []
        for s in scenes:
            log = torch.as_tensor(s.trajectory, dtype=torch.float64)  # (A, T, 5)
            valid = torch.as_tensor(s.valid)
            pair = valid[:, :-1] & valid[:, 1:]
            act = dyn.inverse(log[:, :-1], log[:, 1:], s.dt)
            nxt = dyn.forward(log[:, :-1], act, s.dt)
            step_pos.append((nxt[..., :2] - log[:, 1:, :2]).norm(dim=-1)[pair])
            step_head.append(wrap_angle(nxt[..., 2] - log[:, 1:, 2]).abs()[pair])
            always = valid[:, 10:].all(dim=1)
            state = log[always, 10]
            for t in range(10, s.num_steps - 1):
                state = dyn.forward(state, act[always, t], s.dt)
            open_pos.append((state[:, :2] - log[always, -1, :2]).norm(dim=-1))
        sp, sh, op = torch.cat(step_pos), torch.cat(step_head), torch.cat(open_pos)
        out[name] = {"one_step_pos_err_m": {"mean": round(sp.mean().item(), 5), "max": round(sp.max().item(), 5)},
                     "one_step_heading_err_rad": {"mean": round(sh.mean().item(), 6), "max": round(sh.max().item(), 6)},
                     "open_loop_8s_final_pos_err_m": {"mean": round(op.mean().item(), 4),
                                                      "max": round(op.max().item(), 4)}}
    return out


def main() -> None:
    parser = data_parser(__doc__)
    parser.add_argument("--scenes", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(measure(args.dataset, args.split, args.scenes, args.data_dir), indent=1))


if __name__ == "__main__":
    main()
