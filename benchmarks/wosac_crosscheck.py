"""Score the same rollouts with trafficgym's realism metric and with the official Waymo implementation, and print
the per-metric differences (JSON).

The official code (``waymo-open-dataset-tf-2-12-0==1.6.7``: TensorFlow 2.13, numpy 1.23) cannot share a
virtualenv with trafficgym, so it runs in its own, on files this script writes:

    python3.11 -m venv ~/wosac && ~/wosac/bin/pip install waymo-open-dataset-tf-2-12-0==1.6.7
    python benchmarks/wosac_crosscheck.py --official-python ~/wosac/bin/python --agent idm --scenes 4

Steps (each also a subcommand): ``export`` rolls the agent out on the first scenes of a split (32 rollouts,
WOSAC protocol), saves each scene's rollouts as trafficgym's npz and our metrics as JSON; ``official`` (run by the
other interpreter; imports neither torch nor trafficgym) builds the official ``Scenario`` and ``ScenarioRollouts``
protos from those files — every agent valid at the current step simulated and evaluated, the map's metric road
edges as road-edge features, signals as dynamic lane states — and scores them with the 2024 and 2025
configurations; ``compare`` prints, per metric, our value, the official one and the largest difference.

The official code takes minutes per scene on a 2-core CPU, mostly in the distance to the road edge, which it
computes against every road-edge segment at once. To bound its memory, road-edge polylines are handed to it in
pieces cut only at vertices where consecutive segments are collinear; the official sign rules give the same
value there with or without the cut, so the distances are unchanged.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METRICS = {  # ours -> official field
    "realism_linear_speed": "linear_speed_likelihood",
    "realism_linear_accel": "linear_acceleration_likelihood",
    "realism_angular_speed": "angular_speed_likelihood",
    "realism_angular_accel": "angular_acceleration_likelihood",
    "realism_distance_to_nearest_object": "distance_to_nearest_object_likelihood",
    "realism_collision": "collision_indication_likelihood",
    "realism_time_to_collision": "time_to_collision_likelihood",
    "realism_distance_to_road_edge": "distance_to_road_edge_likelihood",
    "realism_offroad": "offroad_indication_likelihood",
    "realism_traffic_light_violation": "traffic_light_violation_likelihood",
    "realism_meta_wosac2024": "metametric_2024",
    "realism_meta_wosac2025": "metametric_2025",
    "min_ade": "min_average_displacement_error",
}


# ------------------------------------------------------------------------------------------------------------
# export (trafficgym's virtualenv)
# ------------------------------------------------------------------------------------------------------------

def export(args: argparse.Namespace) -> None:
    import torch

    from agents.registry import make_agent
    from envs.data import open_dataset
    from envs.metrics.episode import compute_episode_metrics
    from training.rollouts import save_rollouts, simulate_scene

    out = Path(args.out)
    ds = open_dataset(args.dataset, args.split, data_dir=args.data_dir)
    agent = make_agent(args.agent, checkpoint=args.checkpoint)
    ours, seconds = {}, []
    for i in args.scene or range(min(args.scenes, len(ds))):
        rollouts = simulate_scene(agent, ds, i, args.rollouts, seed=args.seed + i)
        save_rollouts(rollouts, out)
        start = time.perf_counter()
        with torch.inference_mode():
            m = compute_episode_metrics(rollouts, ["realism", "min_ade"])
        seconds.append(time.perf_counter() - start)
        ours[rollouts.scene_id] = {k: m[k] for k in METRICS}
    (out / "ours.json").write_text(json.dumps({"agent": args.agent, "metrics_s": seconds, "scenes": ours}, indent=1))


# ------------------------------------------------------------------------------------------------------------
# official (the official package's virtualenv: numpy + tensorflow only)
# ------------------------------------------------------------------------------------------------------------

def _pieces(line: np.ndarray, max_points: int = 32, min_span: float = 2.0) -> list[np.ndarray]:
    """``line`` cut at collinear interior vertices into pieces of about ``max_points`` points whose ends are at
    least ``min_span`` m apart (shorter ones would read as closed rings). A ring is cut only if it has such a
    vertex, starting from one, so that its closing point lies inside a piece."""
    closed = len(line) > 3 and np.hypot(*(line[0] - line[-1])) < 1e-6
    seg = np.diff(line, axis=0)
    n = len(seg)

    def collinear(j: int) -> bool:  # the joint between segment j - 1 and segment j (mod n on a ring)
        a, b = seg[(j - 1) % n], seg[j % n]
        return abs(a[0] * b[1] - a[1] * b[0]) <= 1e-9 * np.hypot(*a) * np.hypot(*b) and float(a @ b) > 0

    joints = {j for j in range(0 if closed else 1, n) if collinear(j)}
    if not joints:
        return [line]
    first = min(joints) if closed else 0
    pieces, current = [], []
    for k in range(n):
        j = (first + k) % n
        if len(current) >= max_points - 1 and j in joints:
            pts = np.concatenate([line[current], line[[current[-1] + 1]]])
            if np.hypot(*(pts[0] - pts[-1])) >= min_span:
                pieces.append(pts)
                current = []
        current.append(j)
    pieces.append(np.concatenate([line[current], line[[current[-1] + 1]]]))
    return pieces


def _road_edge_pieces(xy: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    out = []
    for p in range(len(offsets) - 1):
        out.extend(_pieces(xy[offsets[p]:offsets[p + 1]].astype(np.float64)))
    return out


_TYPES = {0: 1, 1: 2, 2: 3, 3: 4}  # AgentType -> official ObjectType


def _scenario(d: dict, scenario_pb2, map_pb2):
    t_all = d["log_x"].shape[1]
    h = int(d["history_steps"])
    sc = scenario_pb2.Scenario(scenario_id=str(d["scene_id"]), current_time_index=h - 1,
                               timestamps_seconds=[float(i * d["dt"]) for i in range(t_all)])
    live = np.flatnonzero(d["log_valid"][:, h - 1])
    for a in range(len(d["agent_ids"])):
        track = sc.tracks.add(id=a + 1, object_type=_TYPES[int(d["agent_type"][a])])
        for t in range(t_all):
            track.states.add(center_x=float(d["log_x"][a, t]), center_y=float(d["log_y"][a, t]),
                             center_z=float(d["log_z"][a, t]), length=float(d["length"][a]),
                             width=float(d["width"][a]), height=1.5, heading=float(d["log_heading"][a, t]),
                             velocity_x=0.0, velocity_y=0.0, valid=bool(d["log_valid"][a, t]))
    ego = int(d["ego_index"])
    sc.sdc_track_index = ego if ego >= 0 and ego in live else int(live[0])
    for a in live:
        sc.tracks_to_predict.add(track_index=int(a))
    fid = 1
    for piece in _road_edge_pieces(d["road_edge_xy"], d["road_edge_offsets"]):
        f = sc.map_features.add(id=fid)
        fid += 1
        f.road_edge.polyline.extend([map_pb2.MapPoint(x=float(x), y=float(y), z=0.0) for x, y in piece])
    if len(d["tl_signal_lane"]):
        lane_id = {}
        for lane in np.unique(d["tl_segment_lane"]):
            segs = d["tl_lane_segments"][d["tl_segment_lane"] == lane]
            pts = np.concatenate([segs[:, :2], segs[-1:, 2:]])
            f = sc.map_features.add(id=fid)
            lane_id[int(lane)] = fid
            fid += 1
            f.lane.type = map_pb2.LaneCenter.TYPE_SURFACE_STREET
            f.lane.polyline.extend([map_pb2.MapPoint(x=float(x), y=float(y), z=0.0) for x, y in pts])
        for t in range(t_all):
            dyn = sc.dynamic_map_states.add()
            for k, lane in enumerate(d["tl_signal_lane"]):
                state = map_pb2.TrafficSignalLaneState.LANE_STATE_STOP if d["tl_red"][k, t] else \
                    map_pb2.TrafficSignalLaneState.LANE_STATE_GO
                sx, sy = (float(v) for v in d["tl_stop_point"][k])
                dyn.lane_states.add(lane=lane_id[int(lane)], state=state,
                                    stop_point=map_pb2.MapPoint(x=sx, y=sy, z=0.0))
    return sc, live


def _submission(d: dict, live: np.ndarray, sim_agents_submission_pb2):
    h = int(d["history_steps"])
    if not d["valid"][:, live, h:].all():
        raise ValueError(f"{d['scene_id']}: some simulated agent is missing at a future step; the official metric "
                         "needs complete rollouts (trafficgym eval's sim_agents setting completes them).")
    out = sim_agents_submission_pb2.ScenarioRollouts(scenario_id=str(d["scene_id"]))
    for r in range(d["x"].shape[0]):
        scene = out.joint_scenes.add()
        for a in live:
            scene.simulated_trajectories.add(
                center_x=d["x"][r, a, h:].tolist(), center_y=d["y"][r, a, h:].tolist(),
                center_z=d["z"][r, a, h:].tolist(), heading=d["heading"][r, a, h:].tolist(), object_id=int(a) + 1)
    return out


def official(args: argparse.Namespace) -> None:
    from google.protobuf import text_format
    from waymo_open_dataset.protos import map_pb2, scenario_pb2, sim_agents_metrics_pb2, sim_agents_submission_pb2
    from waymo_open_dataset.utils.sim_agents import submission_specs
    from waymo_open_dataset.wdl_limited.sim_agents_metrics import metrics as wosac_metrics

    root = Path(wosac_metrics.__file__).parent
    configs = {}
    for year, name in (("2024", "challenge_2024_config.textproto"),
                       ("2025", "challenge_2025_sim_agents_config.textproto")):
        configs[year] = text_format.Parse((root / name).read_text(), sim_agents_metrics_pb2.SimAgentMetricsConfig())
    out, seconds = {}, []
    for path in sorted(Path(args.out).glob("*.npz")):
        with np.load(path, allow_pickle=False) as f:
            d = {k: f[k] for k in f.files}
        sc, live = _scenario(d, scenario_pb2, map_pb2)
        sub = _submission(d, live, sim_agents_submission_pb2)
        submission_specs.validate_scenario_rollouts(sub, sc)  # the official submission spec (32 x 80 steps, ...)
        start = time.perf_counter()
        row = {}
        for year, config in configs.items():
            m = wosac_metrics.compute_scenario_metrics_for_bundle(config, sc, sub)
            row[f"metametric_{year}"] = float(m.metametric)
            if year == "2025":
                for field in METRICS.values():
                    if not field.startswith("metametric"):
                        row[field] = float(getattr(m, field))
        seconds.append(time.perf_counter() - start)
        out[str(d["scene_id"])] = row
        print(f"{d['scene_id']}: {seconds[-1]:.0f} s", file=sys.stderr)
    (Path(args.out) / "official.json").write_text(json.dumps({"metrics_s": seconds, "scenes": out}, indent=1))


# ------------------------------------------------------------------------------------------------------------
# compare
# ------------------------------------------------------------------------------------------------------------

def compare(args: argparse.Namespace) -> dict:
    ours = json.loads((Path(args.out) / "ours.json").read_text())
    theirs = json.loads((Path(args.out) / "official.json").read_text())
    scenes = sorted(set(ours["scenes"]) & set(theirs["scenes"]))
    rows = {}
    for key, field in METRICS.items():
        a = np.array([ours["scenes"][s][key] for s in scenes])
        b = np.array([theirs["scenes"][s][field] for s in scenes])
        rows[key] = {"ours_mean": float(a.mean()), "official_mean": float(b.mean()),
                     "max_abs_diff": float(np.abs(a - b).max()), "per_scene_diff": (a - b).round(6).tolist()}
    # medians: the first scene of a fresh process also loads the compiled loops
    result = {"agent": ours["agent"], "scenes": scenes, "metrics": rows,
              "seconds_per_scene": {"ours": float(np.median(ours["metrics_s"])),
                                    "official": float(np.median(theirs["metrics_s"]))}}
    result["speedup"] = result["seconds_per_scene"]["official"] / result["seconds_per_scene"]["ours"]
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", nargs="?", default="all", choices=["all", "export", "official", "compare"])
    parser.add_argument("--official-python", help="the interpreter of the official package's virtualenv")
    parser.add_argument("--agent", default="idm")
    parser.add_argument("--checkpoint")
    parser.add_argument("--dataset", default="towns")
    parser.add_argument("--split", default="val")
    parser.add_argument("--data-dir")
    parser.add_argument("--scenes", type=int, default=4, help="the first N scenes of the split")
    parser.add_argument("--scene", type=int, action="append", help="a scene index instead (repeatable)")
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/wosac_crosscheck")
    args = parser.parse_args()
    if args.step in ("all", "export"):
        export(args)
    if args.step == "official":
        official(args)
    if args.step == "all":
        if not args.official_python:
            parser.error("--official-python is needed to run the official code (see the module docstring)")
        subprocess.run([args.official_python, __file__, "official", "--out", args.out], check=True)
    if args.step in ("all", "compare"):
        compare(args)


if __name__ == "__main__":
    main()
