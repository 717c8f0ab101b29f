"""Property tests for the geometry helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from envs.geometry import box_corners, densify_polyline, wrap_angle

coords = st.floats(-1e3, 1e3, allow_nan=False, width=32)
polylines = st.integers(2, 12).flatmap(lambda n: arrays(np.float64, (n, 2), elements=coords))


@settings(max_examples=200, deadline=None)
@given(polylines, st.floats(0.1, 50.0))
def test_densify_bounds_spacing_and_keeps_vertices_and_length(points, spacing):
    dense = densify_polyline(points, spacing)
    gaps = np.linalg.norm(np.diff(dense, axis=0), axis=1)
    assert gaps.max() <= spacing * (1 + 1e-9) + 1e-9
    # Original vertices survive exactly and in order.
    np.testing.assert_array_equal(dense[0], points[0])
    np.testing.assert_array_equal(dense[-1], points[-1])
    kept = [bool((dense == p).all(axis=1).any()) for p in points]
    assert all(kept)
    length = np.linalg.norm(np.diff(points, axis=0), axis=1).sum()
    assert gaps.sum() == pytest.approx(length, rel=1e-9, abs=1e-6)


def test_densify_exact_small_case():
    out = densify_polyline(np.array([[0.0, 0.0], [5.0, 0.0]]), 2.0)
    np.testing.assert_allclose(out, [[0, 0], [5 / 3, 0], [10 / 3, 0], [5, 0]])
    with pytest.raises(ValueError, match="max_spacing must be > 0"):
        densify_polyline(out, 0.0)


@given(st.floats(-1e4, 1e4, allow_nan=False))
def test_wrap_angle_range_and_equivalence(a):
    w = float(wrap_angle(a))
    assert -np.pi <= w < np.pi
    assert np.cos(w) == pytest.approx(np.cos(a), abs=1e-6) and np.sin(w) == pytest.approx(np.sin(a), abs=1e-6)


def test_box_corners_exact():
    corners = box_corners(np.array(1.0), np.array(2.0), np.array(np.pi / 2), np.array(4.0), np.array(2.0))
    # Heading +y: front is +y, left is -x.
    np.testing.assert_allclose(corners, [[0, 4], [0, 0], [2, 0], [2, 4]], atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(coords, coords, st.floats(-10, 10), st.floats(0.1, 20), st.floats(0.1, 5))
def test_box_corners_form_a_ccw_rectangle_of_the_right_size(x, y, h, length, width):
    c = box_corners(np.array(x), np.array(y), np.array(h), np.array(length), np.array(width)).astype(np.float64)
    assert np.linalg.norm(c[0] - c[1]) == pytest.approx(length, rel=1e-6, abs=1e-4)
    assert np.linalg.norm(c[1] - c[2]) == pytest.approx(width, rel=1e-6, abs=1e-4)
    area = 0.5 * np.sum(c[:, 0] * np.roll(c[:, 1], -1) - np.roll(c[:, 0], -1) * c[:, 1])
    assert area == pytest.approx(length * width, rel=1e-5, abs=1e-3)  # positive: counter-clockwise
    np.testing.assert_allclose(c.mean(axis=0), [x, y], atol=1e-3)


def test_lane_exits_are_the_ends_of_lanes_without_successors_and_passed_exit_measures_from_them():
    import torch

    from envs.map_index import lane_exits, passed_exit
    from envs.types import PolylineType
    from tests.scenes import make_map

    # lane 0 (0,0)->(50,0) continues into lane 1 (50,0)->(50,40); lane 1 ends: the only exit, heading +y
    m = make_map([(np.array([[0.0, 0.0], [50.0, 0.0]]), PolylineType.LANE_CENTER),
                  (np.array([[50.0, 0.0], [50.0, 40.0]]), PolylineType.LANE_CENTER),
                  (np.array([[0.0, -3.0], [50.0, -3.0]]), PolylineType.ROAD_EDGE)], successors=[(0, 1)])
    np.testing.assert_allclose(lane_exits(m), [[50.0, 40.0, 0.0, 1.0]], atol=1e-6)
    exits = torch.as_tensor(lane_exits(m))
    points = torch.tensor([[50.0, 40.5], [52.9, 45.0], [53.1, 45.0], [50.0, 39.5], [50.0, 70.0], [50.0, 70.5],
                           [25.0, 0.0]])
    assert passed_exit(points, exits).tolist() == [True, True, False, False, True, False, False]
    assert passed_exit(points[None], exits[:0]).shape == (1, 7)  # no exits: nobody leaves


# ---- frames ----------------------------------------------------------------------------------------------------

angles = st.floats(-10.0, 10.0, allow_nan=False)
point_lists = st.lists(st.tuples(coords, coords), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(coords, coords, angles, point_lists)
def test_world_frame_world_round_trip_numpy_and_torch(ox, oy, h, pts):
    import torch

    from envs.geometry import to_local, to_world

    p = np.array(pts, np.float64)
    origin = np.array([ox, oy])
    back = to_world(to_local(p, origin, np.float64(h)), origin, np.float64(h))
    np.testing.assert_allclose(back, p, rtol=0, atol=1e-9)
    tp, to, th = torch.as_tensor(p), torch.as_tensor(origin), torch.tensor(h, dtype=torch.float64)
    local = to_local(tp, to, th)
    assert isinstance(local, torch.Tensor)
    # the same formula, numpy or torch (their cos / sin may differ in the last bit)
    np.testing.assert_allclose(local.numpy(), to_local(p, origin, np.float64(h)), rtol=0, atol=1e-12)
    # Distances to the origin are kept.
    np.testing.assert_allclose(np.linalg.norm(local.numpy(), axis=-1), np.linalg.norm(p - origin, axis=-1),
                               rtol=1e-12, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(coords, coords, angles, coords, coords, angles)
def test_pose_in_frame_and_back(fx, fy, fh, px, py, ph):
    import torch

    from envs.geometry import pose_from_frame, pose_in_frame, to_local

    frame = torch.tensor([fx, fy, fh], dtype=torch.float64)
    pose = torch.tensor([px, py, ph], dtype=torch.float64)
    local = pose_in_frame(pose, frame)
    assert -np.pi <= float(local[2]) < np.pi
    back = pose_from_frame(local, frame)
    torch.testing.assert_close(back[:2], pose[:2], rtol=0, atol=1e-9)
    assert float(wrap_angle(back[2] - pose[2]).abs()) < 1e-9
    # The position part is exactly to_local's; wrap=False leaves the heading difference as it is.
    assert torch.equal(local[:2], to_local(pose[None, :2], frame[:2], frame[2])[0])
    assert float(pose_in_frame(pose, frame, wrap=False)[2]) == ph - fh


def test_frames_exact_cases():
    import torch

    from envs.geometry import pose_from_frame, pose_in_frame, rotate_to_local, to_local, to_world

    # A frame at (1, 2) facing +y: ahead is +y, left is -x.
    origin, h = np.array([1.0, 2.0]), np.pi / 2
    np.testing.assert_allclose(to_local(np.array([[1.0, 5.0], [0.0, 2.0]]), origin, h), [[3, 0], [0, 1]], atol=1e-12)
    np.testing.assert_allclose(to_world(np.array([[3.0, 0.0], [0.0, 1.0]]), origin, h), [[1, 5], [0, 2]], atol=1e-12)
    # Vectors rotate but do not move: a velocity along +y is straight ahead.
    np.testing.assert_allclose(rotate_to_local(np.array([[0.0, 4.0], [-1.0, 0.0]]), h), [[4, 0], [0, 1]], atol=1e-12)
    frame = torch.tensor([1.0, 2.0, np.pi / 2], dtype=torch.float64)
    local = pose_in_frame(torch.tensor([1.0, 5.0, np.pi], dtype=torch.float64), frame)
    torch.testing.assert_close(local, torch.tensor([3.0, 0.0, np.pi / 2], dtype=torch.float64))
    torch.testing.assert_close(pose_from_frame(local, frame), torch.tensor([1.0, 5.0, -np.pi], dtype=torch.float64))
    # Broadcasting: K poses against one frame each.
    many = pose_in_frame(torch.zeros(3, 5, 3, dtype=torch.float64), frame.expand(3, 1, 3))
    assert many.shape == (3, 5, 3)


@settings(max_examples=100, deadline=None)
@given(angles, point_lists)
def test_rotate_to_local_is_to_local_about_the_origin(h, vecs):
    from envs.geometry import rotate_to_local, to_local

    v = np.array(vecs, np.float64)
    np.testing.assert_array_equal(rotate_to_local(v, np.float64(h)), to_local(v, np.zeros(2), np.float64(h)))


def test_every_frame_caller_is_the_geometry_helper():
    """The agents' and metrics' transforms are the geometry ones, bit for bit (one formula, one home)."""
    import torch

    from agents.nn.attention import relative_pose
    from agents.smart.tokenizer import _relative, place
    from envs.geometry import pose_from_frame, pose_in_frame

    g = torch.Generator().manual_seed(0)
    q = (torch.rand(32, 3, generator=g) - 0.5) * 100
    k = (torch.rand(32, 6, 3, generator=g) - 0.5) * 100
    assert torch.equal(relative_pose(q[:, None], k), pose_in_frame(k, q[:, None], wrap=False))
    assert torch.equal(_relative(k, q), pose_in_frame(k, q[:, None]))
    assert torch.equal(place(k, q), pose_from_frame(k, q[:, None]))


# ---- polylines -------------------------------------------------------------------------------------------------

def test_arc_length_and_resample_exact():
    from envs.geometry import arc_length, resample_polyline

    line = np.array([[0.0, 0.0], [3.0, 4.0], [3.0, 10.0]])
    np.testing.assert_array_equal(arc_length(line), [0.0, 5.0, 11.0])
    np.testing.assert_array_equal(arc_length(np.stack([line, 2 * line])), [[0, 5, 11], [0, 10, 22]])  # batched
    np.testing.assert_allclose(resample_polyline(np.array([[0.0, 0.0], [10.0, 0.0]]), 2.5),
                               [[0, 0], [2.5, 0], [5, 0], [7.5, 0], [10, 0]])
    np.testing.assert_allclose(resample_polyline(line, 4.0), [[0, 0], [2.4, 3.2], [3, 7]])  # 8 m: 3 m up
    assert resample_polyline(line[:1], 1.0).tolist() == [[0.0, 0.0]]  # one point
    assert resample_polyline(np.zeros((3, 2)), 1.0).tolist() == [[0.0, 0.0]]  # zero length
    assert resample_polyline(np.zeros((0, 2)), 1.0).shape == (0, 2)
    with pytest.raises(ValueError, match="spacing must be > 0"):
        resample_polyline(line, 0.0)


@settings(max_examples=200, deadline=None)
@given(polylines, st.floats(0.1, 50.0))
def test_resample_keeps_spacing_along_the_line(points, spacing):
    from envs.geometry import arc_length, resample_polyline

    out = resample_polyline(points, spacing)
    total = arc_length(points)[-1]
    assert (len(out) - 1) * spacing <= total + 1e-6 and len(out) * spacing > total - 1e-6  # every full step
    np.testing.assert_array_equal(out[0], points[0])
    # Consecutive samples are never farther apart than the spacing (straight-line distance <= arc distance).
    if len(out) > 1:
        assert np.linalg.norm(np.diff(out, axis=0), axis=1).max() <= spacing * (1 + 1e-9) + 1e-6


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.integers(2, 12))
def test_split_polyline_pieces_share_ends_and_cover_the_line(n, size):
    from envs.geometry import split_polyline

    points = np.arange(2 * n, dtype=np.float64).reshape(n, 2)
    pieces = split_polyline(points, size)
    assert len(pieces) >= 1 and all(len(p) <= size for p in pieces)
    for a, b in zip(pieces, pieces[1:], strict=False):
        np.testing.assert_array_equal(a[-1], b[0])  # consecutive pieces share an end point
    rebuilt = np.concatenate([pieces[0], *[p[1:] for p in pieces[1:]]]) if n else pieces[0]
    np.testing.assert_array_equal(rebuilt, points)


def test_split_polyline_exact_and_bad_size():
    from envs.geometry import split_polyline

    pieces = split_polyline(np.arange(7), 3)
    assert [p.tolist() for p in pieces] == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    assert [p.tolist() for p in split_polyline(np.arange(4), 3)] == [[0, 1, 2], [2, 3]]
    assert [p.tolist() for p in split_polyline(np.arange(1), 3)] == [[0]]
    with pytest.raises(ValueError, match="points_per_piece must be >= 2"):
        split_polyline(np.arange(4), 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=6), st.integers(0, 10_000),
       st.sampled_from([0.5, 1.0, 2.0]))
def test_batched_resampling_matches_one_at_a_time(sizes, seed, spacing):
    from envs.geometry import resample_polyline, resample_polylines

    rng = np.random.default_rng(seed)
    lines = [np.cumsum(rng.normal(size=(n, 2)) * 3, axis=0) for n in sizes]
    for line, batched in zip(lines, resample_polylines(lines, spacing), strict=True):
        single = resample_polyline(line, spacing)
        assert batched.shape == single.shape
        np.testing.assert_allclose(batched, single, rtol=0, atol=1e-9)


def test_batched_resampling_of_many_polylines_keeps_their_order():
    from envs.geometry import RESAMPLE_CHUNK, resample_polyline, resample_polylines

    rng = np.random.default_rng(3)
    lines = [np.cumsum(rng.normal(size=(int(n), 2)) * 2, axis=0) for n in rng.integers(0, 60, 3 * RESAMPLE_CHUNK + 5)]
    for line, batched in zip(lines, resample_polylines(lines, 1.0), strict=True):
        np.testing.assert_allclose(batched, resample_polyline(line, 1.0), rtol=0, atol=1e-9)
