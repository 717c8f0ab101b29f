"""Episode metrics: hand-computed features and metrics, geometric properties, every error path, and realism on
real logs (the log scores near the top of the scale and above constant-velocity rollouts)."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.errors import NoEgoError, UnknownNameError
from envs.geometry import box_corners, boxes_overlap
from envs.map_index import build_map_index
from envs.metrics.blm import JSD_BINS, final_displacement_diversity, histogram, jensen_shannon
from envs.metrics.episode import (
    RolloutError,
    Rollouts,
    compute_episode_metrics,
    episode_metric_names,
    rollouts_from_log,
)
from envs.metrics.features import (
    TTC_CAP,
    box_signed_distance,
    interaction_features,
    kinematic_features,
    road_edge_features,
)
from envs.metrics.kernels import wosac_kinematics, wosac_log_likelihoods
from envs.metrics.planning import ego_planning_metrics
from envs.metrics.realism import (
    BERNOULLI_PSEUDOCOUNT,
    META_WEIGHTS,
    PSEUDOCOUNT,
    REALISM_FEATURES,
    displacement_errors,
    min_ade,
    realism_meta,
)
from envs.road_edges import build_road_edges
from envs.types import AgentType, PolylineType
from tests.scenes import make_map, make_scene, straight_road

DT = 0.1


def box(x, y, h, length, width) -> torch.Tensor:
    return torch.tensor([x, y, h, length, width], dtype=torch.float64)


def frame(states, extents):
    """One-step, one-sample inputs of ``interaction_features``: states ``[(x, y, h, vx, vy)]``."""
    s = torch.tensor(states, dtype=torch.float32)[None, :, None, :]  # (1, A, 1, 5)
    return s, torch.ones(s.shape[:3], dtype=torch.bool), torch.tensor(extents, dtype=torch.float32)


def scene_rollouts(tracks, rollouts: int = 2, **kw) -> Rollouts:
    scene = make_scene(tracks, **kw)
    return rollouts_from_log(scene, rollouts, 11, build_map_index(scene.map))


# ------------------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------------------

def test_box_distance_overlap_gap_and_corner_cases():
    a = box(0, 0, 0, 4, 2)
    assert float(box_signed_distance(a, box(3, 0, 0, 4, 2))) == pytest.approx(-1.0)  # 1 m lengthwise overlap
    assert float(box_signed_distance(a, box(0, 1.5, 0, 4, 2))) == pytest.approx(-0.5)  # sideways is shallower
    assert float(box_signed_distance(a, box(6, 0, 0, 4, 2))) == pytest.approx(2.0)  # 2 m gap
    assert float(box_signed_distance(a, box(4, 0, 0, 4, 2))) == pytest.approx(0.0, abs=1e-9)  # touching
    # Corner to corner: nearest points (2, 1) and (3, 2) -> sqrt(2).
    assert float(box_signed_distance(a, box(5, 3, 0, 4, 2))) == pytest.approx(math.sqrt(2))
    # A diamond (2x2 square turned 45°) whose corner points at a's front face from 1 m away.
    d = box_signed_distance(a, box(3 + math.sqrt(2), 0, math.pi / 4, 2, 2))
    assert float(d) == pytest.approx(1.0)


finite = st.floats(-50, 50, allow_nan=False)
boxes = st.tuples(finite, finite, st.floats(-4, 4), st.floats(0.5, 8), st.floats(0.5, 3))


@settings(max_examples=150, deadline=None)
@given(boxes, boxes, st.floats(-math.pi, math.pi), finite, finite)
def test_box_distance_symmetric_rigid_invariant_and_matches_overlap(ba, bb, turn, tx, ty):
    a, b = box(*ba), box(*bb)
    d = float(box_signed_distance(a, b))
    assert float(box_signed_distance(b, a)) == pytest.approx(d, abs=1e-6)

    def moved(q):
        c, s = math.cos(turn), math.sin(turn)
        return box(c * q[0] - s * q[1] + tx, s * q[0] + c * q[1] + ty, q[2] + turn, q[3], q[4])

    assert float(box_signed_distance(moved(ba), moved(bb))) == pytest.approx(d, abs=1e-6)
    if abs(d) > 1e-6:
        ca = box_corners(a[0], a[1], a[2], a[3], a[4])
        cb = box_corners(b[0], b[1], b[2], b[3], b[4])
        assert bool(boxes_overlap(ca, cb)) == (d < 0)
        # Separated: no corner of one box is closer than d to the other's corners (d is a lower bound).
        if d > 0:
            assert torch.cdist(ca, cb).min() >= d - 1e-6


def test_interaction_features_distance_collision_and_overlap_counts():
    s, v, ext = frame([(0, 0, 0, 0, 0), (3, 0, 0, 0, 0), (0, 10, 0, 0, 0)], [(4, 2)] * 3)
    f = interaction_features(s, v, ext)
    np.testing.assert_allclose(f["distance_to_nearest_object"].value[0, :, 0], [-1.0, -1.0, 8.0], atol=1e-5)
    assert f["collision"].value[0, :, 0].tolist() == [True, True, False]
    assert f["overlaps_agents"].value[0, :, 0].tolist() == [1, 1, 0]
    # A context object overlapping agent 2 counts as context, invalid objects are ignored, and context objects
    # (not present at the current step) are no WOSAC objects: the nearest distance ignores them.
    ctx = torch.tensor([[[0.0, 10.5, 0, 0, 0]], [[0.0, 0.0, 0, 0, 0]]])[None]  # (1, 2, 1, 5)
    f = interaction_features(s, v, ext, ctx, torch.tensor([[[True], [False]]]), torch.tensor([[4.0, 2], [4, 2]]))
    assert f["overlaps_context"].value[0, :, 0].tolist() == [0, 0, 1]
    assert float(f["distance_to_nearest_object"].value[0, 2, 0]) == pytest.approx(8.0)
    # Nor are agents outside ``wosac_objects``.
    f = interaction_features(s, v, ext, wosac_objects=torch.tensor([True, False, True]))
    np.testing.assert_allclose(f["distance_to_nearest_object"].value[0, :, 0], [8.0, -1.0, 8.0], atol=1e-5)
    # Alone: the official "no other object" value, 1e10 (it lands in the histogram's top bin).
    f = interaction_features(*frame([(0, 0, 0, 0, 0)], [(4, 2)]))
    assert f["distance_to_nearest_object"].valid.all()
    assert float(f["distance_to_nearest_object"].value) == 1e10


def test_rounded_box_distance_corner_to_corner():
    # Two 4.5 x 2 m cars 1 m apart corner to corner (diagonally): sharp boxes sqrt(2) m apart, but WOSAC's corners
    # are rounded with radius 0.7 x 1 m, so the distance is between the rounded corners: 2.4 sqrt(2) - 1.4 m.
    s, v, ext = frame([(0, 0, 0, 0, 0), (5.5, 3.0, 0, 0, 0)], [(4.5, 2), (4.5, 2)])
    assert float(box_signed_distance(box(0, 0, 0, 4.5, 2), box(5.5, 3, 0, 4.5, 2))) == pytest.approx(math.sqrt(2))
    d = interaction_features(s, v, ext)["distance_to_nearest_object"].value[0, :, 0]
    np.testing.assert_allclose(d, [2.4 * math.sqrt(2) - 1.4] * 2, atol=1e-5)
    assert float(d[0]) == pytest.approx(1.994, abs=1e-3)


def test_nearest_distance_exact_beyond_the_neighbour_broad_phase():
    # A long truck whose centre is far but whose box is nearest: the certificate must redo the row.
    states = [(0, 0, 0, 0, 0), (30, 0, 0, 0, 0)] + [(0, 8 + 2 * i, 0, 0, 0) for i in range(5)]
    extents = [(4, 2), (50, 2)] + [(1, 1)] * 5
    f = interaction_features(*frame(states, extents), neighbours=2)
    assert float(f["distance_to_nearest_object"].value[0, 0, 0]) == pytest.approx(3.0)  # truck rear at x=5


placed = st.tuples(st.floats(-40, 40), st.floats(-40, 40), st.floats(-4, 4), st.floats(1, 12), st.floats(0.5, 3),
                   st.booleans())


@settings(max_examples=60, deadline=None)
@given(st.lists(placed, min_size=2, max_size=12), st.integers(1, 8), st.integers(0, 3))
def test_nearest_distance_and_overlaps_match_brute_force(objects, neighbours, n_context):
    # Every object against every other by the reference box distance: the compiled loop's nearest distance and
    # overlap counts must agree whatever the neighbour count (its circle-bound pruning is exact).
    n_context = min(n_context, len(objects) - 1)
    a = len(objects) - n_context
    states = torch.tensor([(x, y, h, 0.0, 0.0) for x, y, h, *_ in objects], dtype=torch.float32)
    ext = torch.tensor([(length, width) for *_, length, width, _ in objects], dtype=torch.float32)
    valid = torch.tensor([ok for *_, ok in objects])
    f = interaction_features(states[None, :a, None], valid[None, :a, None], ext[:a], states[None, a:, None],
                             valid[None, a:, None], ext[a:], neighbours=neighbours)
    boxes = torch.cat([states[:, :3], ext], dim=-1).double()
    d = box_signed_distance(boxes[:, None], boxes[None, :])  # (N, N), sharp boxes
    # rounded boxes (WOSAC): the cores' distance minus both corner radii
    radius = 0.7 * ext.double().min(dim=-1).values / 2
    cores = torch.cat([boxes[:, :3], boxes[:, 3:] - 2 * radius[:, None]], dim=-1)
    rounded = box_signed_distance(cores[:, None], cores[None, :]) - radius[:, None] - radius[None, :]
    others = valid[None] & ~torch.eye(len(objects), dtype=torch.bool)
    d = torch.where(others, d, torch.inf)
    rounded = torch.where(others & (torch.arange(len(objects)) < a)[None], rounded, torch.inf)[:, :a]
    for i in range(a):
        assert bool(f["distance_to_nearest_object"].valid[0, i, 0]) == bool(valid[i])
        if valid[i]:
            expected = float(rounded[i].min()) if torch.isfinite(rounded[i]).any() else 1e10
            assert float(f["distance_to_nearest_object"].value[0, i, 0]) == pytest.approx(expected, abs=2e-4)
        if valid[i]:  # overlap counts, up to boxes within float32 rounding of touching
            for name, cols in (("overlaps_agents", d[i, :a]), ("overlaps_context", d[i, a:])):
                count = int(f[name].value[0, i, 0])
                assert int((cols < -1e-4).sum()) <= count <= int((cols < 1e-4).sum())


def reference_signed_distances(point: np.ndarray, polylines: list[np.ndarray], tie: float = 1e-9) -> list[float]:
    """The WOSAC road-edge distance by its definition, one point, every segment (no grid): the nearest segment
    (first on ties), signed by its side, or at a vertex by the two segments meeting there (the larger side at a
    left turn, the smaller at a right turn); at an open end, by the end segment's side. Returns the value for every
    segment within ``tie`` of the nearest (float rounding decides between exact ties)."""
    found = []
    for line in polylines:
        closed = np.hypot(*(line[0] - line[-1])) < 1.0
        segs = [(line[k], line[k + 1]) for k in range(len(line) - 1) if np.any(line[k] != line[k + 1])]
        for k, (a, b) in enumerate(segs):
            e, d = b - a, point - a
            t = float(d @ e / (e @ e))
            found.append((float(np.hypot(*(d - min(max(t, 0), 1) * e))), t, k, segs, closed))
    nearest = min(f[0] for f in found)
    out = []
    for dist, t, k, segs, closed in found:
        if dist > nearest + tie:
            continue

        def side(j, segs=segs):
            a, b = segs[j]
            return float(np.sign((point[0] - a[0]) * (b[1] - a[1]) - (point[1] - a[1]) * (b[0] - a[0])))

        def left_turn(i, j, segs=segs):
            (a0, a1), (b0, b1) = segs[i], segs[j]
            return (a1 - a0)[0] * (b1 - b0)[1] - (a1 - a0)[1] * (b1 - b0)[0] > 0

        n = side(k)
        if t < 0 and (k > 0 or closed):
            other = (k - 1) % len(segs)
            n = max(n, side(other)) if left_turn(other, k) else min(n, side(other))
        elif t > 1 and (k < len(segs) - 1 or closed):
            other = (k + 1) % len(segs)
            n = max(n, side(other)) if left_turn(k, other) else min(n, side(other))
        out.append(n * dist)
    return out


coordinate = st.floats(-30, 30, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(coordinate, coordinate), min_size=2, max_size=6), min_size=1, max_size=3),
       st.lists(st.booleans(), min_size=3, max_size=3),
       st.lists(st.tuples(st.floats(-150, 150), st.floats(-150, 150)), min_size=1, max_size=20))
def test_road_edge_distance_equals_the_definition(lines, close, points):
    # random open and closed polylines, points on and far beyond the candidate grid: the gridded query must equal
    # the brute-force definition exactly
    polylines = []
    for pts, c in zip(lines, close, strict=False):
        p = np.asarray(pts, np.float64)
        p = p[np.r_[True, np.hypot(*np.diff(p, axis=0).T) > 1e-3]]  # no repeated points
        if len(p) >= 2 and c and len(p) >= 3:
            p = np.concatenate([p, p[:1]])
        if len(p) >= 2:
            polylines.append(p)
    if not polylines:
        return
    edges = build_road_edges(polylines, margin=20.0)
    pts = np.asarray(points, np.float64)
    got = edges.signed_distance(pts)
    for q, g in zip(pts, got, strict=True):
        assert any(g == pytest.approx(ref, abs=1e-8) for ref in reference_signed_distances(q, polylines))


def test_road_edge_distance_signs_of_open_and_closed_edges():
    # A square ring (counter-clockwise: the inside is road) and the same edge as two open pieces.
    ring = np.array([[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]], np.float64)
    edges = build_road_edges([ring])
    np.testing.assert_allclose(edges.signed_distance(np.array([[5, 5], [5, -2], [-1, -1], [12, 5], [5, 9]])),
                               [-5, 2, math.sqrt(2), 2, -1])
    # open: a straight edge along +x with the road on its left (y > 0); beyond its end the end segment decides
    line = build_road_edges([np.array([[0, 0], [10, 0]], np.float64)])
    np.testing.assert_allclose(line.signed_distance(np.array([[5, 3], [5, -3], [13, 4], [13, -4], [13, 0]])),
                               [-3, 3, -5, 5, 0])


def test_interaction_loop_results_do_not_depend_on_chunking():
    # Frames are processed in chunks, each seeding its neighbour search from the previous frame: any chunking
    # (hence any thread count) must give identical features on a moving multi-step scene.
    from envs.metrics.kernels import interaction_pairs

    rng = np.random.default_rng(0)
    n, steps = 30, 40
    start = rng.uniform(-60, 60, (n, 2))
    vel = rng.normal(0, 6, (n, 2))
    t = np.arange(steps)[:, None, None] * DT
    xy = start[None] + vel[None] * t
    s = np.concatenate([xy, np.arctan2(vel[..., 1], vel[..., 0])[None, :, None].repeat(steps, 0),
                        vel[None].repeat(steps, 0)], axis=-1).astype(np.float32)
    v = rng.random((steps, n)) > 0.1
    ext = np.stack([rng.uniform(3, 12, n), rng.uniform(1.5, 2.6, n)], -1).astype(np.float32)
    params = (TTC_CAP, 1.309, 0.1745, 0.5, 0.5, 2.0, 4.0, 1.5, 2.5, 0.2)
    agents, agents_valid = s[:, :20].transpose(1, 0, 2)[None].copy(), v[:, :20].T[None].copy()  # (1, 20, T, ...)
    context, context_valid = s[:, 20:].transpose(1, 0, 2).copy(), v[:, 20:].T.copy()  # (10, T, ...)
    speed = np.linalg.norm(agents[..., 3:5], axis=-1).astype(np.float32)
    wosac = rng.random(20) < 0.8
    one = interaction_pairs(agents, agents_valid, speed, context, context_valid, ext, wosac, 8, params, 1)
    many = interaction_pairs(agents, agents_valid, speed, context, context_valid, ext, wosac, 8, params, 7)
    for x, y in zip(one, many, strict=True):
        np.testing.assert_array_equal(x, y)


def test_time_to_collision_follower_closing():
    # Follower (4.5 m) at 10 m/s, leader 10 m ahead (bumper to bumper) at 5 m/s: TTC = 10 / 5 = 2 s.
    s, v, ext = frame([(0, 0, 0, 10, 0), (14.5, 0, 0, 5, 0)], [(4.5, 2), (4.5, 2)])
    f = interaction_features(s, v, ext)
    ttc = f["time_to_collision"].value[0, :, 0]
    assert float(ttc[0]) == pytest.approx(2.0)
    assert float(ttc[1]) == TTC_CAP  # the leader follows nobody
    # Not closing, crossing at 90°, or one lane over: nothing to collide with.
    for other in [(14.5, 0, 0, 12, 0), (14.5, 0, math.pi / 2, 0, 5), (14.5, 3.5, 0, 0, 0)]:
        f = interaction_features(*frame([(0, 0, 0, 10, 0), other], [(4.5, 2), (4.5, 2)]))
        assert float(f["time_to_collision"].value[0, 0, 0]) == TTC_CAP
    # Speeds are the given magnitudes (positions' central differences in the metric), not the velocity vectors.
    s, v, ext = frame([(0, 0, 0, 0, 0), (14.5, 0, 0, 0, 0)], [(4.5, 2), (4.5, 2)])
    f = interaction_features(s, v, ext, speed=torch.tensor([[[10.0], [5.0]]]))
    assert float(f["time_to_collision"].value[0, 0, 0]) == pytest.approx(2.0)
    # NaN speed (no central difference at the scene's last step): the cap.
    f = interaction_features(s, v, ext, speed=torch.tensor([[[float("nan")], [5.0]]]))
    assert float(f["time_to_collision"].value[0, 0, 0]) == TTC_CAP
    # Closest approach (BLM): head-on at 10 m/s each, 20 m apart centre to centre -> 1 s.
    f = interaction_features(*frame([(0, 0, 0, 10, 0), (20, 0, math.pi, -10, 0)], [(4.5, 2), (4.5, 2)]))
    assert float(f["closest_approach_ttc"].value[0, 0, 0]) == pytest.approx(1.0)


def test_time_to_collision_official_following_rules():
    # Westbound pair straddling +-pi: the same direction of travel, but headings are not wrapped in the official
    # definition (|3.1 - (-3.1)| > 75°), so the car ahead is not followed: 5 s (3 s with wrapped headings).
    west = [(0, 0, 3.1, -10, 0), (-15.0, -0.3, -3.1, -5, 0)]
    f = interaction_features(*frame(west, [(4.5, 2), (4.5, 2)]))
    assert float(f["time_to_collision"].value[0, 0, 0]) == TTC_CAP
    west[1] = (-15.0, -0.3, 3.1, -5, 0)  # the same heading value: followed
    f = interaction_features(*frame(west, [(4.5, 2), (4.5, 2)]))
    assert float(f["time_to_collision"].value[0, 0, 0]) == pytest.approx((15.0 - 4.5) / 5, abs=0.05)
    # A small lateral overlap (< 0.5 m) counts only with a heading difference <= 10°.
    for heading, followed in ((0.0, True), (math.radians(9), True), (math.radians(20), False)):
        y = 1.0 + (2.25 * math.sin(heading) + 1.0 * math.cos(heading)) - 0.2  # lateral overlap 0.2 m
        f = interaction_features(*frame([(0, 0, 0, 10, 0), (20.0, y, heading, 0, 0)], [(4.5, 2), (4.5, 2)]))
        assert (float(f["time_to_collision"].value[0, 0, 0]) < TTC_CAP) == followed
        f = interaction_features(*frame([(0, 0, 0, 10, 0), (20.0, y - 0.4, heading, 0, 0)], [(4.5, 2), (4.5, 2)]))
        assert float(f["time_to_collision"].value[0, 0, 0]) < TTC_CAP  # 0.6 m of overlap: followed at 20° too
    # The nearest of several followed objects, whatever the order, and none beyond reach matters.
    objs = [(0, 0, 0, 10, 0), (60, 0, 0, 0, 0), (25, 0.2, 0, 0, 0), (40, 0, 0, 0, 0)]
    f = interaction_features(*frame(objs, [(4.5, 2)] * 4))
    assert float(f["time_to_collision"].value[0, 0, 0]) == pytest.approx((25 - 4.5) / 10)


def test_rss_longitudinal_and_lateral():
    # 10 m/s behind a stopped car 5 m away: RSS needs 10*0.5 + 0.5*2*0.25 + 11^2/8 = 20.375 m.
    f = interaction_features(*frame([(0, 0, 0, 10, 0), (9.5, 0, 0, 0, 0)], [(4.5, 2), (4.5, 2)]))
    assert bool(f["rss_longitudinal"].value[0, 0, 0])
    assert not bool(f["rss_longitudinal"].value[0, 1, 0])
    f = interaction_features(*frame([(0, 0, 0, 10, 0), (40, 0, 0, 0, 0)], [(4.5, 2), (4.5, 2)]))
    assert not f["rss_longitudinal"].value.any()
    # Side by side 0.1 m apart, not moving sideways: below mu + 0.5*1.5*0.25... -> violation; 5 m apart -> fine.
    f = interaction_features(*frame([(0, 0, 0, 10, 0), (0, 2.1, 0, 10, 0)], [(4.5, 2), (4.5, 2)]))
    assert f["rss_lateral"].value.all()
    f = interaction_features(*frame([(0, 0, 0, 10, 0), (0, 7.0, 0, 10, 0)], [(4.5, 2), (4.5, 2)]))
    assert not f["rss_lateral"].value.any()


def test_kinematics_of_a_constant_acceleration_track():
    t = torch.arange(20, dtype=torch.float64) * DT
    v0, acc = 3.0, 1.5
    x = v0 * t + 0.5 * acc * t**2
    traj = torch.stack([x, torch.zeros_like(t), torch.zeros_like(t), torch.zeros_like(t), torch.zeros_like(t)], -1)
    valid = torch.ones(20, dtype=torch.bool)
    valid[15] = False  # a gap: features using step 15 become invalid
    k = kinematic_features(traj[None], valid[None], DT)
    speed, accel = k["linear_speed"], k["linear_accel"]
    ok = speed.valid[0]
    assert ok.tolist() == [False] + [True] * 13 + [False] * 3 + [True] * 2 + [False]
    np.testing.assert_allclose(speed.value[0][ok], (v0 + acc * t)[ok], atol=1e-9)
    assert accel.valid[0].sum() == 11 + 0  # steps 2..12 (central differences of valid speeds)
    np.testing.assert_allclose(accel.value[0][accel.valid[0]], acc, atol=1e-9)
    np.testing.assert_allclose(k["jerk"].value[0][k["jerk"].valid[0]], 0, atol=1e-8)
    # Turning at 0.3 rad/s across the ±pi wrap: angular speed exact, angular acceleration 0.
    heading = torch.remainder(3.0 + 0.3 * t + math.pi, 2 * math.pi) - math.pi
    traj[..., 2] = heading
    k = kinematic_features(traj[None], torch.ones(1, 20, dtype=torch.bool), DT)
    np.testing.assert_allclose(k["angular_speed"].value[0, 1:-1], 0.3, atol=1e-9)
    np.testing.assert_allclose(k["angular_accel"].value[0, 2:-2], 0.0, atol=1e-8)


def test_road_edge_distance_on_a_straight_road():
    ix = build_map_index(straight_road())  # road |y| <= 3.5, SDF grid 0.25 m
    ys = [0.0, 2.5, 4.5, -10.0]  # 4 x 2 boxes: worst corner at |y| + 1
    traj = torch.tensor([[[[100.0, y, 0, 0, 0]] for y in ys]])  # (1, 4, 1, 5)
    ext = torch.tensor([[4.0, 2.0]] * 4)
    types = torch.tensor([AgentType.VEHICLE, AgentType.VEHICLE, AgentType.VEHICLE, AgentType.PEDESTRIAN])
    f = road_edge_features(traj, torch.ones(1, 4, 1, dtype=torch.bool), ext, types, ix)
    d = f["distance_to_road_edge"].value[0, :, 0]
    np.testing.assert_allclose(d, [-2.5, 0.0, 2.0, 7.5], atol=1e-6)  # exact: the edge segments themselves
    assert f["offroad"].value[0, :, 0].tolist() == [False, False, True, False]  # pedestrians never off-road
    f = road_edge_features(traj, torch.ones(1, 4, 1, dtype=torch.bool), ext, types, None)
    assert not f["distance_to_road_edge"].valid.any()
    assert not f["offroad"].valid.any()


# ------------------------------------------------------------------------------------------------------------
# Realism
# ------------------------------------------------------------------------------------------------------------

def likelihoods(sim, sim_use, log, log_use, bins, low=0.0, high=1.0):
    """``wosac_log_likelihoods`` of one feature: sim ``(R, A, T)``, log ``(A, T)`` -> (sum, count) per object."""
    values = np.concatenate([np.asarray(sim, np.float32), np.asarray(log, np.float32)[None]])
    use = np.concatenate([np.asarray(sim_use, bool), np.asarray(log_use, bool)[None]])
    total, count = wosac_log_likelihoods((values,), (use,), len(sim), np.array([low], np.float32),
                                         np.array([high - low], np.float32), np.array([bins], np.int64), PSEUDOCOUNT,
                                         BERNOULLI_PSEUDOCOUNT, np.ones(values.shape[1], bool))
    return total[0], count[0]


def reference_log_likelihoods(sim, sim_use, log, log_use, bins, low, high):
    """The official estimators, written out: per object a histogram of its used rollout values (clipped into the
    end bins, NaN in the top bin, 0.1 per bin) scoring its scored log values; booleans: any-over-time per rollout
    over the log-scored steps, two bins with 0.001 each, scoring the log's any-over-time."""
    r, a, t = sim.shape
    total, count = np.zeros(a), np.zeros(a)
    for i in range(a):
        if bins == 0:
            hits = sum(bool(np.any(sim[k, i] & sim_use[k, i] & log_use[i])) for k in range(r))
            p = (hits + 0.001) / (r + 0.002)
            total[i], count[i] = math.log(p if np.any(log[i] & log_use[i]) else 1 - p), 1
            continue

        def bin_of(x):
            if np.isnan(x):
                return bins - 1
            return int(min(max(np.float32((np.float32(x) - np.float32(low)) / np.float32(high - low) * bins), 0),
                           bins - 1))

        counts = np.full(bins, 0.1)
        for k in range(r):
            for j in range(t):
                if sim_use[k, i, j]:
                    counts[bin_of(sim[k, i, j])] += 1
        for j in range(t):
            if log_use[i, j]:
                total[i] += math.log(counts[bin_of(log[i, j])] / counts.sum())
                count[i] += 1
    return total, count


def test_histogram_likelihood_pools_objects_and_steps():
    # object 0: sim values [0.5, 0.5 | 1.5, -3 (clips into bin 0)], log [0.5, 7 (clips into bin 1)]
    # object 1: every sim value in bin 0, the log in bin 1 (a badly matched object)
    sim = np.array([[[0.5, 0.5], [0.2, 0.2]], [[1.5, -3.0], [0.3, 0.3]]])  # (R=2, A=2, T=2)
    log = np.array([[0.5, 7.0], [1.2, 1.8]])
    ok = np.ones((2, 2, 2), bool)
    total, count = likelihoods(sim, ok, log, np.ones((2, 2), bool), bins=2, high=2.0)
    p0 = [3.1 / 4.2, 1.1 / 4.2]  # object 0: bins [3, 1] + 0.1 each
    p1 = [4.1 / 4.2, 0.1 / 4.2]
    np.testing.assert_allclose(total, [math.log(p0[0]) + math.log(p0[1]), 2 * math.log(p1[1])], rtol=1e-6)
    np.testing.assert_allclose(count, [2, 2])
    pooled = math.exp(total.sum() / count.sum())  # the official aggregation
    per_object = np.mean([math.sqrt(p0[0] * p0[1]), p1[1]])  # what averaging objects' likelihoods would give
    assert pooled == pytest.approx((p0[0] * p0[1] * p1[1] ** 2) ** 0.25)
    assert pooled < per_object
    # unused sim values do not count; unscored log values neither; NaN lands in the top bin
    ok[1, 0, 1] = False
    total, count = likelihoods(sim, ok, log, [[True, False], [False, False]], bins=2, high=2.0)
    assert total[0] == pytest.approx(math.log(2.1 / 3.2))
    assert count.tolist() == [1, 0]
    sim[0, 0, :] = np.nan
    total, _ = likelihoods(sim, np.ones((2, 2, 2), bool), [[np.nan, 0.5], [0, 0]], [[True, False], [False, False]],
                           bins=2, high=2.0)
    assert total[0] == pytest.approx(math.log(3.1 / 4.2))  # -3 in bin 0; 1.5 and the two NaN in the top bin


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(1, 5), st.integers(1, 7))
def test_compiled_likelihoods_equal_the_reference(seed, r, a, t):
    # every realism feature's spec, random values around (and beyond) its range, NaN now and then, random use
    rng = np.random.default_rng(seed)
    for sp in REALISM_FEATURES.values():
        lo, hi = (sp.low, sp.high) if not sp.boolean else (0.0, 1.0)
        span = hi - lo
        if sp.boolean:
            sim, log = rng.random((r, a, t)) < 0.3, rng.random((a, t)) < 0.3
        else:  # bin edges hit exactly now and then
            sim = rng.uniform(lo - span / 4, hi + span / 4, (r, a, t))
            edges = rng.random((r, a, t)) < 0.2
            sim[edges] = lo + span * rng.integers(0, 5, edges.sum()) / 4
            sim[rng.random((r, a, t)) < 0.05] = np.nan
            log = rng.uniform(lo - span / 4, hi + span / 4, (a, t))
            sim, log = sim.astype(np.float32), log.astype(np.float32)
        sim_ok, log_ok = rng.random((r, a, t)) < 0.8, rng.random((a, t)) < 0.7
        got = likelihoods(sim, sim_ok, log, log_ok, sp.bins, lo, hi)
        ref = reference_log_likelihoods(sim, sim_ok, log, log_ok, sp.bins, lo, hi)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(got[1], ref[1])


def test_boolean_likelihood_any_over_time_masked_by_the_log():
    sim = np.zeros((4, 1, 3), bool)
    sim[0, 0, 2] = True  # one rollout of four collides at some step
    ok = np.ones((4, 1, 3), bool)
    total, count = likelihoods(sim, ok, [[False, True, False]], [[True, True, True]], bins=0)
    assert math.exp(total[0]) == pytest.approx(1.001 / 4.002)
    assert count[0] == 1
    total, _ = likelihoods(sim, ok, np.zeros((1, 3), bool), [[True, True, True]], bins=0)
    assert math.exp(total[0]) == pytest.approx(1 - 1.001 / 4.002)
    # the collision came at a step where the log is not valid: the official metric does not count it
    total, _ = likelihoods(sim, ok, np.zeros((1, 3), bool), [[True, True, False]], bins=0)
    assert math.exp(total[0]) == pytest.approx(4.001 / 4.002)  # a "perfect" boolean: ~1, not 0.9969
    # an object with no valid logged step still counts (as never true)
    total, count = likelihoods(sim, ok, np.zeros((1, 3), bool), np.zeros((1, 3), bool), bins=0)
    assert math.exp(total[0]) == pytest.approx(4.001 / 4.002)
    assert count[0] == 1


def test_wosac_kinematics_padding_and_validity():
    # constant acceleration along x from step 0; 11 history steps of 21
    t = np.arange(21) * DT
    traj = np.zeros((2, 21, 5))
    traj[:, :, 0] = 3.0 * t + 0.75 * t**2
    valid = np.ones((2, 21), bool)
    values, use = wosac_kinematics(traj, valid, DT, 11, np.array([True, False]))
    speed, accel = values[0], values[1]
    np.testing.assert_allclose(speed[0, :-1], (3.0 + 1.5 * t)[11:-1], atol=1e-9)
    assert np.isnan(speed[:, -1]).all()  # past the end of the scene: NaN
    assert np.isnan(accel[:, -2:]).all()
    np.testing.assert_allclose(accel[0, :-2], 1.5, atol=1e-8)  # the first future steps use the history
    # the log is scored from the future steps' validity alone: speed not at the first or last future step,
    # acceleration not at the first two or last two; a rollout's values all enter its histogram
    assert use[0, 0].tolist() == [False] + [True] * 8 + [False]
    assert use[1, 0].tolist() == [False] * 2 + [True] * 6 + [False] * 2
    assert use[:, 1].all()
    # angular speed across the +-pi wrap; angular acceleration 0
    traj[:, :, 2] = np.remainder(3.0 + 0.3 * t + math.pi, 2 * math.pi) - math.pi
    values, _ = wosac_kinematics(traj, valid, DT, 0, np.array([True, False]))
    np.testing.assert_allclose(values[2, 0, 1:-1], 0.3, atol=1e-9)
    np.testing.assert_allclose(values[3, 0, 2:-2], 0.0, atol=1e-7)


def test_meta_metric_weighting_and_presets():
    ones = dict.fromkeys(REALISM_FEATURES, 1.0)
    for preset, weights in META_WEIGHTS.items():
        assert sum(weights.values()) == pytest.approx(1.0)
        assert realism_meta(ones, preset) == pytest.approx(1.0)
    assert realism_meta({**ones, "collision": 0.0}, "wosac2024") == pytest.approx(0.75)
    assert realism_meta({**ones, "distance_to_road_edge": 0.0}, "wosac2024") == pytest.approx(0.90)
    assert realism_meta({**ones, "distance_to_road_edge": 0.0}, "wosac2025") == pytest.approx(0.95)
    assert realism_meta({**ones, "traffic_light_violation": 0.0}, "wosac2024") == pytest.approx(1.0)
    # NaN features (no road edges) are dropped, the rest renormalised.
    half = {**ones, "offroad": float("nan"), "distance_to_road_edge": float("nan"), "collision": 0.5}
    assert realism_meta(half, "wosac2024") == pytest.approx((0.65 - 0.125) / 0.65)
    with pytest.raises(UnknownNameError, match="wosac2024"):
        realism_meta(ones, "wosac2042")


def test_min_ade_ade_fde_exact():
    r = scene_rollouts([dict(x0=10, y0=-1.75, speed=5.0), dict(x0=60, y0=-1.75, speed=5.0)], num_steps=21)
    sim = r.sim.clone()
    h = r.history_steps
    for ri, agent, dy in [(0, 0, 1.0), (0, 1, 3.0), (1, 0, 2.0), (1, 1, 0.5)]:
        sim[ri, agent, h:, 1] += dy
    r = replace(r, sim=sim)
    # the official ADE divides the 10 future errors by all 21 valid logged steps (the history adds no error)
    scale = 10 / 21
    assert min_ade(r) == pytest.approx(1.25 * scale)  # rollout means 2.0 and 1.25
    ade, fde, ok = displacement_errors(r)
    np.testing.assert_allclose(ade, np.array([[1, 3], [2, 0.5]]) * scale, atol=1e-5)
    np.testing.assert_allclose(fde, [[1, 3], [2, 0.5]], atol=1e-5)
    m = compute_episode_metrics(r, ["min_ade"])
    assert m["ade"] == pytest.approx(1.625 * scale)
    assert m["min_ade"] == pytest.approx(1.25 * scale)
    # agents not valid at the current step are no WOSAC objects: left out
    late = r.log_valid.clone()
    late[1, :h] = False
    assert min_ade(replace(r, log_valid=late, sim_valid=r.sim_valid & late)) == pytest.approx(1.0 * scale)


def test_realism_of_the_log_itself_on_a_hand_built_scene():
    r = scene_rollouts([dict(x0=10, y0=-1.75, speed=8.0), dict(x0=40, y0=-1.75, speed=5.0)], rollouts=4)
    m = compute_episode_metrics(r, ["realism"])
    assert set(m) == {f"realism_{k}" for k in REALISM_FEATURES} | {"realism_meta_wosac2024", "realism_meta_wosac2025"}
    # Each agent's 80 future speeds x 4 rollouts: 79 in its speed's bin and the last step's NaN (the central
    # difference runs past the scene) in the top bin; + 0.1 in each of 10 bins. The log is scored at 78 steps.
    assert m["realism_linear_speed"] == pytest.approx(316.1 / 321.0, abs=1e-6)
    assert m["realism_collision"] == pytest.approx(4.001 / 4.002)
    # A closing gap sweeps the distance histogram's bins, so even the log's own likelihood is far below 1 there.
    assert m["realism_distance_to_nearest_object"] < 0.5
    per_feature = {k: m[f"realism_{k}"] for k in REALISM_FEATURES}
    for preset, weights in META_WEIGHTS.items():
        assert m[f"realism_meta_{preset}"] == pytest.approx(sum(w * per_feature[k] for k, w in weights.items()))


# ------------------------------------------------------------------------------------------------------------
# BLM and planning
# ------------------------------------------------------------------------------------------------------------

def test_jensen_shannon_identical_and_disjoint():
    spec = JSD_BINS["linear_speed"]
    p = histogram(torch.tensor([1.5, 2.5, 2.5]), torch.ones(3, dtype=torch.bool), spec)
    q = histogram(torch.tensor([20.5, 21.5]), torch.ones(2, dtype=torch.bool), spec)
    assert jensen_shannon(p, p) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon(p, q) == pytest.approx(math.log(2))  # natural log: disjoint supports give ln 2
    # By hand: m = [0.75, 0.25, 0]; JSD = (KL(p||m) + KL(q||m)) / 2.
    expected = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert jensen_shannon(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, 0.5, 0.0])) == pytest.approx(expected)
    assert math.isnan(jensen_shannon(p, torch.zeros_like(p)))


def test_blm_collision_rate_fdd_and_jsd_of_the_log():
    # Two overlapping cars side by side for the whole scene: 1 pair per step over 2 agents -> rate 0.5.
    r = scene_rollouts([dict(x0=10, y0=-1.75, speed=5.0), dict(x0=11, y0=-1.0, speed=5.0)], rollouts=3,
                       num_steps=31)
    m = compute_episode_metrics(r, ["blm_safety", "blm_jsd", "blm_fdd"])
    assert m["blm_collision_rate"] == pytest.approx(0.5)
    assert m["blm_offroad_rate"] == 0.0
    assert m["blm_jsd_speed"] == pytest.approx(0.0)
    assert m["blm_jsd_accel"] == pytest.approx(0.0)
    assert m["blm_fdd"] == pytest.approx(0.0)
    sim = r.sim.clone()
    sim[1, :, -1, 0] += 3.0  # rollout 1 ends 3 m further: pairwise distances 3, 3, 0 -> FDD 2
    assert final_displacement_diversity(replace(r, sim=sim)) == pytest.approx(2.0, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 5), st.integers(1, 6))
def test_safety_totals_equal_masked_sums(seed, r, a, t):
    # the one-pass totals behind blm_safety against the plain masked reductions they replace
    from envs.metrics.kernels import safety_totals

    rng = np.random.default_rng(seed)
    own, off_ok = rng.random((r, a, t)) < 0.7, rng.random((r, a, t)) < 0.6
    over_a, over_c = rng.integers(0, 3, (r, a, t)) * own, rng.integers(0, 2, (r, a, t)) * own
    vehicle = rng.random(a) < 0.5
    off = (rng.random((r, a, t)) < 0.3) & off_ok & vehicle[None, :, None]
    approach = rng.uniform(0, 5, (r, a, t)).astype(np.float32)
    rss_long, rss_lat = (rng.random((r, a, t)) < 0.2) & own, (rng.random((r, a, t)) < 0.2) & own
    got = safety_totals(own, over_a, over_c, off, off_ok, vehicle, approach, rss_long, rss_lat)
    veh_steps = off_ok & vehicle[None, :, None]
    expected = np.stack([own.sum((1, 2)), over_a.sum((1, 2)) / 2 + over_c.sum((1, 2)), off.sum((1, 2)),
                         veh_steps.sum((1, 2)), np.where(own, approach, np.inf).min((1, 2)), rss_long.sum((1, 2)),
                         rss_lat.sum((1, 2))], -1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_fdd_skips_rollouts_without_a_final_position():
    r = scene_rollouts([dict(x0=10, y0=-1.75, speed=5.0), dict(x0=60, y0=-1.75, speed=5.0)], rollouts=3,
                       num_steps=31)
    sim, valid = r.sim.clone(), r.sim_valid.clone()
    sim[1, 0, -1, 0] += 4.0  # agent 0: final positions 0, 4, 0 m apart -> pairwise 4, 0, 4 -> 8 / 3
    valid[2, 0, r.history_steps:] = False  # ... unless rollout 2 has no future: one pair, 4 m
    valid[1:, 1, r.history_steps:] = False  # agent 1: a final position in one rollout only, not counted
    assert final_displacement_diversity(replace(r, sim=sim, sim_valid=valid)) == pytest.approx(4.0, abs=1e-5)


def test_planning_metrics_of_a_constant_speed_ego():
    r = scene_rollouts([dict(x0=10, y0=-1.75, speed=5.0), dict(x0=100, y0=-1.75, speed=5.0)], num_steps=31)
    m = ego_planning_metrics(r)
    assert m["planning_progress"] == pytest.approx(5.0 * 2.0, abs=1e-3)  # 20 future steps at 5 m/s
    assert m["planning_collision"] == 0
    assert m["planning_offroad"] == 0
    assert m["planning_max_jerk"] == pytest.approx(0, abs=1e-3)
    assert m["planning_ade"] == pytest.approx(0)
    assert m["planning_min_ttc"] == TTC_CAP
    assert m["planning_min_ade"] == pytest.approx(0)
    no_ego = replace(r, ego_index=-1)
    with pytest.raises(NoEgoError, match="ego_index=-1"):
        ego_planning_metrics(no_ego)
    assert all(math.isnan(v) for v in compute_episode_metrics(no_ego, ["planning"]).values())


def test_planning_ade_is_the_egos_even_behind_agents_that_enter_later():
    # agent 0 enters after the current step (not a WOSAC object, so not a displacement column); the ego is
    # agent 1, shifted 2 m sideways over all 20 future steps of rollout 1: ADE 0 and 2 * 20 / 31 (the official
    # ADE divides by the valid logged steps, history included)
    r = scene_rollouts([dict(x0=10, y0=1.75, speed=5.0), dict(x0=40, y0=-1.75, speed=5.0)], num_steps=31,
                       ego_index=1)
    log_valid, sim_valid, sim = r.log_valid.clone(), r.sim_valid.clone(), r.sim.clone()
    log_valid[0, :15], sim_valid[:, 0, :15] = False, False  # as the ego setting evaluates every agent
    sim[1, 1, r.history_steps:, 1] += 2.0
    assert r.ego_index == 1
    m = ego_planning_metrics(replace(r, sim=sim, sim_valid=sim_valid, log_valid=log_valid))
    assert m["planning_ade"] == pytest.approx((0 + 2.0 * 20 / 31) / 2, rel=1e-5)
    assert m["planning_min_ade"] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Error paths
# ------------------------------------------------------------------------------------------------------------

def test_errors_name_the_problem():
    r = scene_rollouts([dict(x0=10, y0=-1.75, speed=5.0), dict(x0=40, y0=-1.75, speed=5.0)], num_steps=21)
    bad_sim = r.sim.clone()
    bad_sim[0, 0, 15, 0] = float("nan")
    bad_log = r.log.clone()
    bad_log[1, 18, 4] = float("inf")
    reordered = r.sim.clone().flip(1)
    cases = [
        (replace(r, sim=r.sim[..., :4]), "sim must be"),
        (replace(r, log_valid=r.log_valid[:, :5]), "log_valid has shape"),
        (replace(r, sim=bad_sim), "sim holds NaN"),
        (replace(r, log=bad_log), "log holds NaN"),
        (replace(r, context=bad_log, context_valid=r.log_valid, context_extent=r.extent), "context holds NaN"),
        (replace(r, agent_ids=np.array(["0"])), "1 agent ids for 2"),
        (replace(r, agent_ids=np.array(["a", "a"])), "not unique"),
        (replace(r, sim=reordered), "order of agent_ids"),
        (replace(r, history_steps=0), "history_steps"),
        (replace(r, context=r.log), "go together"),
        (replace(r, context=r.log, context_valid=r.log_valid, context_extent=r.extent[:1]), "context_extent"),
        (replace(r, extent=-r.extent), "extent"),
        (replace(r, scored=torch.ones(3, dtype=torch.bool)), r"scored must be an \(A,\) = \(2,\) bool mask"),
        (replace(r, scored=torch.ones(2)), "scored must be"),
    ]
    for bad, match in cases:
        with pytest.raises(RolloutError, match=match):
            compute_episode_metrics(bad, ["min_ade"])
    one = replace(r, sim=r.sim[:1], sim_valid=r.sim_valid[:1])
    with pytest.raises(RolloutError, match="at least 2 rollouts"):
        compute_episode_metrics(one, ["realism"])
    with pytest.raises(RolloutError, match="at least 2 rollouts"):
        compute_episode_metrics(one, ["blm_fdd"])
    with pytest.raises(UnknownNameError, match="Did you mean 'realism'"):
        compute_episode_metrics(r, ["realsim"])
    per_sample_context = r.log[None].expand(2, -1, -1, -1)  # context differs per sample: not supported
    with pytest.raises(ValueError, match="shared by every sample"):
        interaction_features(r.sim, r.sim_valid, r.extent, per_sample_context, r.log_valid[None].expand(2, -1, -1),
                             r.extent)
    assert {"realism", "min_ade", "blm_safety", "blm_jsd", "blm_fdd", "planning"} <= set(episode_metric_names())


# ------------------------------------------------------------------------------------------------------------
# Real logs
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def towns_val():
    from envs.data import open_dataset

    return open_dataset("towns", "val")


def constant_velocity(scene, rollouts: int, current: int) -> tuple[np.ndarray, np.ndarray]:
    """R copies of the log whose future continues the state at ``current`` at constant velocity."""
    sim = np.repeat(scene.trajectory[None], rollouts, axis=0)
    valid = np.repeat(scene.valid[None], rollouts, axis=0)
    t = (np.arange(scene.num_steps - current - 1) + 1) * scene.dt
    cur = scene.trajectory[:, current]  # (A, 5)
    fut = np.repeat(cur[:, None], len(t), axis=1)
    fut[..., 0] += cur[:, None, 3] * t
    fut[..., 1] += cur[:, None, 4] * t
    live = scene.valid[:, current]
    sim[:, live, current + 1:] = fut[live]
    valid[:, live, current + 1:] = True
    return sim, valid


def test_realism_on_towns_log_beats_constant_velocity(towns_val):
    scene = towns_val[0]
    ix = towns_val.map_index(scene.map_id)
    live = scene.valid[:, 10]
    log_r = rollouts_from_log(scene, 8, 11, ix)
    sim, valid = constant_velocity(scene, 8, 10)
    cv_r = rollouts_from_log(scene, 8, 11, ix, sim=sim[:, live], sim_valid=valid[:, live])
    log_m = compute_episode_metrics(log_r, ["realism", "min_ade"])
    cv_m = compute_episode_metrics(cv_r, ["realism", "min_ade"])
    assert log_m["min_ade"] == 0.0
    assert cv_m["min_ade"] > 1.0
    for preset in META_WEIGHTS:
        key = f"realism_meta_{preset}"
        assert log_m[key] > 0.8, log_m  # WOSAC's logged-data upper bound is ~0.83
        assert log_m[key] > cv_m[key] + 0.05, (log_m, cv_m)
    assert log_m["realism_collision"] > 0.95
    assert log_m["realism_traffic_light_violation"] > 0.9


def test_distance_travelled_exact():
    from envs.metrics.episode import Rollouts as _R
    from envs.metrics.episode import compute_episode_metrics

    t = 21
    log = torch.zeros(2, t, 5)
    log[0, :, 0] = torch.arange(t) * 1.0  # 1 m per step
    log[1, :, 1] = torch.arange(t) * 0.5  # 0.5 m per step
    sim = log[None].repeat(3, 1, 1, 1)
    valid = torch.ones(3, 2, t, dtype=torch.bool)
    r = _R(scene_id="s", agent_ids=np.array(["a", "b"]), agent_type=torch.zeros(2, dtype=torch.long),
           extent=torch.tensor([[4.0, 2.0], [4.0, 2.0]]), sim=sim, sim_valid=valid, log=log,
           log_valid=torch.ones(2, t, dtype=torch.bool), history_steps=11, dt=0.1)
    # 10 future steps after the current one: (10 * 1.0 + 10 * 0.5) / 2 agents
    assert compute_episode_metrics(r, ["distance_travelled"])["distance_travelled"] == pytest.approx(7.5)


# ------------------------------------------------------------------------------------------------------------
# Traffic lights
# ------------------------------------------------------------------------------------------------------------

def signalised_scene(stop_x: float = 100.0, num_steps: int = 61):
    """An eastbound approach lane up to a stop line at ``stop_x``, a signal-controlled lane after it (red for the
    whole scene), and one car waiting 3 m before the line in the log."""
    from envs.types import TrafficLightState

    m = make_map([(np.array([[0, -1.75], [stop_x, -1.75]]), PolylineType.LANE_CENTER),
                  (np.array([[stop_x, -1.75], [200, -1.75]]), PolylineType.LANE_CENTER),
                  (np.array([[200, 1.75], [0, 1.75]]), PolylineType.LANE_CENTER),
                  (np.array([[0, -3.5], [200, -3.5], [200, 3.5], [0, 3.5], [0, -3.5]]), PolylineType.ROAD_EDGE)],
                 successors=[(0, 1)])
    scene = make_scene([dict(x0=stop_x - 3 - 2.25, y0=-1.75, speed=0.0)], num_steps=num_steps, map_data=m)
    return replace(scene, tl_lane=np.array([1], np.int32),
                   tl_state=np.full((1, num_steps), TrafficLightState.RED, np.int8))


def test_traffic_light_violation_of_a_car_running_the_red():
    from envs.metrics.traffic_lights import TrafficLights

    scene = signalised_scene()
    tl = TrafficLights.from_scene(scene)
    assert tl.stop_point.tolist() == [[100.0, -1.75]]
    assert tl.red.all()
    t = np.arange(61) * 0.1
    xy = np.zeros((2, 1, 61, 2))
    xy[..., 1] = -1.75
    xy[0, 0, :, 0] = 94.75 + 0 * t  # waits
    xy[1, 0, :, 0] = 94.75 + 5.0 * t  # drives through at 5 m/s: passes x = 100 between steps 10 and 11
    v = tl.violations(xy, np.ones((2, 1, 61), bool))
    assert not v[0].any()
    assert np.flatnonzero(v[1, 0]).tolist() == [11]
    # on green nobody violates; an invalid step does not
    green = replace(tl, red=np.zeros_like(tl.red))
    assert not green.violations(xy, np.ones((2, 1, 61), bool)).any()
    gap = np.ones((2, 1, 61), bool)
    gap[1, 0, 11] = False
    assert not tl.violations(xy, gap)[1].any()
    with pytest.raises(ValueError, match="30 steps, the signals 61"):
        tl.violations(xy[:, :, :30], gap[:, :, :30])


def test_traffic_light_likelihood_of_rollouts_running_the_red():
    scene = signalised_scene(num_steps=61)
    waiting = rollouts_from_log(scene, 4, 11, build_map_index(scene.map))
    m = compute_episode_metrics(waiting, ["realism"])
    assert m["realism_traffic_light_violation"] == pytest.approx(4.001 / 4.002)
    sim = waiting.sim.clone()
    t = torch.arange(61 - 11, dtype=torch.float32) * 0.1
    sim[:, 0, 11:, 0] = sim[:, 0, 10:11, 0] + 5.0 * (t + 0.1)  # every rollout drives through the red light
    running = replace(waiting, sim=sim)
    m = compute_episode_metrics(running, ["realism"])
    assert m["realism_traffic_light_violation"] == pytest.approx(0.001 / 4.002)
    assert m["realism_meta_wosac2025"] < compute_episode_metrics(replace(waiting), ["realism"])[
        "realism_meta_wosac2025"]


def test_metric_road_edges_continue_past_the_map_border():
    from envs.map_index import BORDER_STUB, metric_road_edges

    road = straight_road()  # x in [0, 200], lanes cross both ends
    lines = metric_road_edges(road)
    assert len(lines) == 2  # opened into two sides
    assert all(np.hypot(*(ln[0] - ln[-1])) > 1 for ln in lines)
    xs = np.concatenate([ln[:, 0] for ln in lines])
    assert xs.min() == pytest.approx(-BORDER_STUB)
    assert xs.max() == pytest.approx(200 + BORDER_STUB)
    edges = build_road_edges(lines)
    d = edges.signed_distance(np.array([[230.0, -1.75], [-30.0, 1.75], [230.0, 6.0], [100.0, 0.0], [300.0, 0.0]]))
    np.testing.assert_allclose(d[:4], [-1.75, -1.75, 2.5, -3.5])  # beyond the border: still the road's edges
    assert d[4] < 0  # beyond the stubs too: on the road, measured to their ends
    ring_only = make_map([(np.array([[0, -3.5], [50, -3.5], [50, 3.5], [0, 3.5], [0, -3.5]]), PolylineType.ROAD_EDGE)])
    assert len(metric_road_edges(ring_only)) == 1  # no lane crosses it: a closed ring as given


def test_metrics_leave_torch_thread_count_as_it_was():
    # numba's OpenMP pool shares the runtime with torch; a metric call must not make a 1-thread process
    # multi-threaded (thread state is per process: checked in a fresh one)
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1)\n"
            "from tests.test_episode_metrics import scene_rollouts\n"
            "from envs.metrics.episode import compute_episode_metrics\n"
            "r = scene_rollouts([dict(x0=0, y0=0, speed=10.0), dict(x0=20, y0=0, speed=9.0)])\n"
            "compute_episode_metrics(r, ['realism', 'blm_safety'])\n"
            "print(torch.get_num_threads())\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                                                                                           "NUMBA_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "1"
