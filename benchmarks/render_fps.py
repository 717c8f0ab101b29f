"""Renderer throughput: frames per second of ``render_frame`` at 512x512 with ~50 agents, map tiles cached.

The scene is real towns val data: the busiest val scene plus the agents of the next-busiest scene on the same
map (merged, so ~50 agents are live in one frame). The state is stepped through its log while rendering, so every
frame has new poses, trails, collision/off-road checks and HUD text; only the static map tiles are cached (one
untimed warm-up pass over the episode draws them). Prints one JSON object.

    .venv/bin/python benchmarks/render_fps.py [--width 512 --height 512 --camera ego --frames 400]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from envs import sim  # noqa: E402
from envs.data import open_dataset  # noqa: E402
from envs.dynamics import make_dynamics  # noqa: E402
from envs.metrics import compute_step_metrics  # noqa: E402
from envs.types import Action, Scene  # noqa: E402
from render.renderer import MAP_CACHE, RenderConfig, render_frame  # noqa: E402


def merged_scene(ds, target_agents: int = 50) -> Scene:
    """The busiest scene, with agents of other scenes on its map appended until ``target_agents`` are live at
    the start step."""
    counts = {}
    for i in range(len(ds)):
        s = ds[i]
        counts[i] = (int(s.valid[:, 10].sum()), s.map_id)
    order = sorted(counts, key=lambda i: -counts[i][0])
    base = ds[order[0]]
    parts = [base]
    total = counts[order[0]][0]
    for i in order[1:]:
        if total >= target_agents:
            break
        if counts[i][1] == base.map_id:
            extra = ds[i]
            # Only as many of its agents (those live at the start step) as the target still needs.
            keep = np.flatnonzero(extra.valid[:, 10])[: target_agents - total]
            parts.append(Scene(scene_id=extra.scene_id, dataset=extra.dataset, split=extra.split,
                               map_id=extra.map_id, dt=extra.dt, agent_ids=extra.agent_ids[keep],
                               agent_type=extra.agent_type[keep], extent=extra.extent[keep],
                               trajectory=extra.trajectory[keep], valid=extra.valid[keep], ego_index=-1))
            total += len(keep)
    t = min(p.num_steps for p in parts)

    def cat(name):
        return np.concatenate([getattr(p, name) for p in parts])

    return Scene(scene_id=f"{base.scene_id}+{len(parts) - 1}", dataset=base.dataset, split=base.split,
                 map_id=base.map_id, dt=base.dt, agent_ids=cat("agent_ids"), agent_type=cat("agent_type"),
                 extent=cat("extent"), trajectory=np.concatenate([p.trajectory[:, :t] for p in parts]),
                 valid=np.concatenate([p.valid[:, :t] for p in parts]), ego_index=base.ego_index, map=base.map)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--px-per-m", type=float, default=5.0)
    parser.add_argument("--camera", default="ego", choices=("ego", "scene"))
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for the per-frame collision/off-road metrics (tiny kernels: "
                             "one thread avoids OpenMP hand-offs, which stall when the other core is busy)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    ds = open_dataset("towns", "val")
    scene = merged_scene(ds)
    map_data = ds.map(scene.map_id)
    config = RenderConfig(width=args.width, height=args.height, px_per_m=args.px_per_m, camera=args.camera)
    dynamics = make_dynamics("bicycle")  # unused by log replay (no valid actions), but step() needs one

    def episode():
        st = sim.reset([scene], start_step=10, controlled="none")
        states = [st.clone()]
        noop = Action(torch.zeros(1, st.num_agents, 2), torch.zeros(1, st.num_agents, dtype=torch.bool))
        while int(st.t[0]) < int(st.end[0]):
            st = sim.step(st, noop, dynamics)
            states.append(st.clone())
        return states

    with torch.inference_mode():
        states = episode()
    t0 = time.perf_counter()
    for st in states:  # warm-up: draws every map tile the camera visits (the static layer, cached)
        render_frame(st, map_data, config=config)
    warm_s = time.perf_counter() - t0
    tiles = MAP_CACHE.tiles_drawn

    live = [int((st.valid[0, :, int(st.t[0])] & st.agent_mask[0]).sum()) for st in states]

    def timed(per_state_metrics):
        n, t0 = 0, time.perf_counter()
        while n < args.frames:
            for st, metrics in zip(states, per_state_metrics, strict=True):
                frame = render_frame(st, map_data, config=config, metrics=metrics)
                n += 1
                if n >= args.frames:
                    break
        return n, time.perf_counter() - t0, frame

    # Full frames: the renderer computes collisions / off-road itself (torch), as render() in the envs does.
    n, elapsed, frame = timed([None] * len(states))
    # Drawing alone: metrics passed in, as a rollout that already computed them for its rewards would.
    with torch.inference_mode():
        given = [compute_step_metrics(st, ["collision", "offroad"]) for st in states]
    n_draw, elapsed_draw, _ = timed(given)
    assert frame.shape == (args.height, args.width, 3) and frame.dtype == np.uint8
    print(json.dumps({
        "benchmark": "render_fps", "fps": round(n / elapsed, 1), "ms_per_frame": round(1e3 * elapsed / n, 3),
        "fps_metrics_given": round(n_draw / elapsed_draw, 1), "frames": n,
        "width": args.width, "height": args.height, "camera": args.camera,
        "px_per_m": args.px_per_m, "scene": scene.scene_id, "map_id": scene.map_id,
        "agents_in_state": scene.num_agents, "live_agents_mean": round(float(np.mean(live)), 1),
        "map_tiles_drawn_in_warmup": tiles, "warmup_s_incl_tiles": round(warm_s, 3),
        "tiles_drawn_while_timed": MAP_CACHE.tiles_drawn - tiles,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
