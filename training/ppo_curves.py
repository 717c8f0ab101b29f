"""Learning curves of ``trafficgym train ppo --policy gmm_ego`` runs: return, collision rate, off-road rate and
progress against env steps, one colour per run — the training rollouts (with exploration noise, the training
reward; a running mean over 5 rollouts) as thin lines, the periodic validation (the deterministic agent, the
env's own reward) as markers.

    python -m training.ppo_curves RUN_DIR [RUN_DIR ...] --label "IDM traffic" --label "log traffic" --out FILE.png

Each run folder holds ``ppo.json`` (its options), ``tb/`` (TensorBoard: ``train/episode_*`` once per rollout) and
``val.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SMOOTH = 5  # rollouts in the running mean of the training curves
PANELS = (("return", "return"), ("collision", "collision (fraction of episodes)"),
          ("offroad", "off-road (fraction of episodes)"), ("progress", "progress along the route (m)"))


def read_run(run: str | Path) -> dict:
    """``{"train": {key: (steps, values)}, "val": {key: (steps, values)}}`` with env steps on the x axis."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from envs.errors import TrafficGymError

    run = Path(run)
    if not (run / "ppo.json").exists() or not (run / "tb").is_dir():
        raise TrafficGymError(f"{run} is not a gmm_ego PPO run folder (needs ppo.json and tb/).")
    rollout_scenes = int(json.loads((run / "ppo.json").read_text())["scenes"])  # per rollout
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    length = {e.step: e.value for e in acc.Scalars("train/episode_length")}
    steps = sorted(length)
    # one rollout per logged step: its env steps are the episodes' mean length x the scenes per rollout
    env_steps = dict(zip(steps, np.cumsum([length[s] * rollout_scenes for s in steps]), strict=True))
    out: dict = {"train": {}, "val": {}}
    for key, _ in PANELS:
        events = acc.Scalars(f"train/episode_{key}")
        out["train"][key] = (np.array([env_steps[e.step] for e in events]), np.array([e.value for e in events]))
    rows = [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()] if (run / "val.jsonl").exists() \
        else []

    def at(step):  # env steps at a gradient step (validations follow a rollout's last update)
        done = [s for s in steps if s <= step]
        return env_steps[done[-1]] if done else 0

    for key, _ in PANELS:
        out["val"][key] = (np.array([r.get("env_steps", at(r["step"])) for r in rows]),
                           np.array([r[key] for r in rows]))
    return out


def plot(runs: list[str], labels: list[str], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        data = read_run(run)
        colour = f"C{i}"
        for ax, (key, title) in zip(axes, PANELS, strict=True):
            x, y = data["train"][key]
            if len(y) >= SMOOTH:  # a running mean over SMOOTH rollouts (each is only a few scenes)
                y = np.convolve(y, np.ones(SMOOTH) / SMOOTH, mode="valid")
                x = x[SMOOTH - 1:]
            ax.plot(x / 1e3, y, color=colour, alpha=0.45, lw=1)
            vx, vy = data["val"][key]
            ax.plot(vx / 1e3, vy, "o-", color=colour, lw=1.5, label=f"{label} (val)")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("env steps (thousands)")
    axes[0].legend(fontsize=8)
    fig.suptitle("PPO fine-tuning of gmm_ego: training rollouts (thin, running mean of 5) and validation "
                 "(markers)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders of trafficgym train ppo --policy gmm_ego")
    parser.add_argument("--label", action="append", default=None, help="one per run (default: the folder names)")
    parser.add_argument("--out", default="docs/ppo_curves.png")
    args = parser.parse_args(argv)
    labels = args.label or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels")
    print(plot(args.runs, labels, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
