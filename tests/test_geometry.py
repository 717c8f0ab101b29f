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
