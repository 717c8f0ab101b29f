"""Property tests for the geometry helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from envs.geometry import densify_polyline, wrap_angle

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
