"""The published input -> output cases of the official WOSAC tests, against this project's reimplementation.

The official tests live in waymo-research/waymo-open-dataset, ``src/waymo_open_dataset/wdl_limited/
sim_agents_metrics/``: ``estimators_test.py``, ``interaction_features_test.py``, ``map_metric_features_test.py``,
``trajectory_features_test.py`` and ``traffic_light_features_test.py``. Every test below names the official test
(and parametrisation) its inputs and expected values come from; the test code is this project's own.

The official functions take ``(num_objects, num_steps)`` tensors, ours a leading sample dimension as well; their
estimators return one log-likelihood per log sample, ours the per-object sums and counts (so a log sample is given
an object of its own here). Cases our API cannot express are listed, with the reason, where they would be:

- anything reading the binary WOMD test scenario or test submission (``get_womd_test_scenario``): the shape tests of
  the interaction and map features, ``test_distance_to_road_edge_fails_on_missing_map`` and
  ``test_red_light_violation_is_correct_on_synthetic_data`` (``metrics_test.py`` likewise);
- z coordinates (our kinematics and road edges are planar): the 3D speed / acceleration magnitudes of the kinematic
  tests, and the overpass / z-stretch signed-distance tests;
- knobs our implementation fixes: the corner-rounding factor (0.7), the pad values of ``central_diff`` and
  ``central_logical_and`` (NaN and False, what ``compute_kinematic_features`` / ``compute_kinematic_validity`` use);
- the kernel density estimator (not implemented), and the TF API's shape and argument-error checks.

The last section holds synthetic analogues of the scenario-based tests, their expected values computed with the
installed official implementation (not published ones).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from envs.metrics.features import (
    TTC_MAX_HEADING_DIFF,
    TTC_SMALL_OVERLAP,
    TTC_SMALL_OVERLAP_HEADING,
    interaction_features,
    road_edge_features,
)
from envs.metrics.kernels import NO_OBJECT, displacement, wosac_kinematics, wosac_log_likelihoods
from envs.metrics.traffic_lights import TrafficLights
from envs.road_edges import build_road_edges

# The official constants (interaction_features.py), checked against ours below.
MAX_HEADING_DIFF = math.radians(75.0)
MAX_HEADING_DIFF_FOR_SMALL_OVERLAP = math.radians(10.0)
SMALL_OVERLAP_THRESHOLD = 0.5
MAX_TTC_SEC = 5.0
EXTREMELY_LARGE_DISTANCE = 1e10
# The official default of ``additive_smoothing_pseudocount`` (sim_agents_metrics.proto, both estimators).
DEFAULT_PSEUDOCOUNT = 0.001


def test_official_constants_match_ours():
    assert TTC_MAX_HEADING_DIFF == pytest.approx(MAX_HEADING_DIFF)
    assert TTC_SMALL_OVERLAP_HEADING == pytest.approx(MAX_HEADING_DIFF_FOR_SMALL_OVERLAP)
    assert TTC_SMALL_OVERLAP == SMALL_OVERLAP_THRESHOLD
    assert NO_OBJECT == EXTREMELY_LARGE_DISTANCE


# ------------------------------------------------------------------------------------------------------------
# estimators_test.py
# ------------------------------------------------------------------------------------------------------------

def histogram_estimate(log_samples, sim_samples, low: float, high: float, bins: int, pseudocount: float,
                       bool_pseudocount: float = 0.0) -> np.ndarray:
    """The official ``histogram_estimate`` (``bins`` = 0: ``bernoulli_estimate``) with ``wosac_log_likelihoods``.

    log_samples ``(batch, n_log)``, sim_samples ``(batch, n_sim)``. Log sample ``(b, k)`` becomes an object of its
    own, with the ``n_sim`` samples of population ``b`` as its rollouts (one step each) and the log sample as its
    log value. Returns ``(batch, n_log)`` log-likelihoods, as the official function.
    """
    log_samples, sim_samples = np.asarray(log_samples, np.float32), np.asarray(sim_samples, np.float32)
    n_b, n_log = log_samples.shape
    n_sim = sim_samples.shape[1]
    values = np.empty((n_sim + 1, n_b * n_log, 1), np.float32)
    values[:n_sim, :, 0] = np.repeat(sim_samples.T, n_log, axis=1)  # object b * n_log + k: population b
    values[n_sim, :, 0] = log_samples.reshape(-1)
    use = np.ones(values.shape, bool)
    total, count = wosac_log_likelihoods((values,), (use,), n_sim, np.array([low], np.float32),
                                         np.array([high - low], np.float32), np.array([bins], np.int64),
                                         float(pseudocount), float(bool_pseudocount),
                                         np.ones(values.shape[1], bool))
    assert (count == 1).all()
    return total[0].reshape(n_b, n_log)


@pytest.mark.parametrize("pseudocount", [0.0, 0.0001])
def test_histogram_estimate_likelihood_equals_one_with_batchsize3_1sample(pseudocount):
    # official: EstimatorsTest.test_histogram_estimate_likelihood_equals_one_with_batchsize3_1sample (both params)
    ll = histogram_estimate([[0.05], [0.15], [0.25]], [[0.05], [0.15], [0.25]], 0.0, 1.0, 10, pseudocount)
    np.testing.assert_allclose(np.exp(ll), [[1.0], [1.0], [1.0]], atol=0.001)
    # exactly: the one sample's bin, smoothed over 10 bins
    np.testing.assert_allclose(np.exp(ll), (1 + pseudocount) / (1 + 10 * pseudocount), rtol=1e-6)


def test_histogram_returns_correctly():
    # official: EstimatorsTest.test_histogram_returns_correctly (random populations: seeded here)
    rng = np.random.default_rng(0)
    sim = np.stack([rng.uniform(size=10000), rng.normal(0.5, 0.2, size=10000)])
    log = [[0.0, 0.15, 0.5, 1.0], [0.0, 0.15, 0.5, 1.0]]
    ll = histogram_estimate(log, sim, 0.0, 1.0, 10, 0.0)
    assert ll.shape == (2, 4)
    # uniform population: about the same log-probability in every bin
    np.testing.assert_allclose(ll[0] - ll[0].mean(), 0.0, atol=0.1)
    # normal population around 0.5: the largest at the 0.5 sample
    assert int(np.argmax(ll[1])) == 2


@pytest.mark.parametrize("pseudocount, inf", [(DEFAULT_PSEUDOCOUNT, False), (0.0, True), (1.0, False)],
                         ids=["missing_field", "zero_counts", "nonzero_counts"])
def test_histogram_adds_pseudocount(pseudocount, inf):
    # official: EstimatorsTest.test_histogram_adds_pseudocount (missing_field: the proto default, 0.001)
    ll = histogram_estimate([[0.5]], [[0.0, 0.0, 0.0, 1.0]], 0.0, 1.0, 10, pseudocount)
    if inf:
        assert ll[0, 0] == -np.inf
    else:
        assert np.isfinite(ll[0, 0])


def test_bernoulli_returns_correctly():
    # official: EstimatorsTest.test_bernoulli_returns_correctly (BernoulliEstimate(): the default pseudocount)
    sim = [[False] * 4, [True] * 4, [False] * 4, [True] * 4, [True, False, False, False]]
    log = [[False], [True], [True], [False], [True]]
    ll = histogram_estimate(log, sim, 0.0, 1.0, 0, 0.0, bool_pseudocount=DEFAULT_PSEUDOCOUNT)
    assert ll.shape == (5, 1)
    np.testing.assert_allclose(np.exp(ll[:2]), 1.0, atol=1e-2)
    np.testing.assert_allclose(np.exp(ll[2:4]), 0.0, atol=1e-2)
    np.testing.assert_allclose(np.exp(ll[4:]), 0.25, atol=1e-2)
    # exactly: two bins of 4 samples, each smoothed by the pseudocount
    pc = DEFAULT_PSEUDOCOUNT
    hit = np.array([0, 4, 0, 4, 1])
    p_log = np.where(np.array(log)[:, 0], hit + pc, 4 - hit + pc) / (4 + 2 * pc)
    np.testing.assert_allclose(np.exp(ll[:, 0]), p_log, rtol=1e-6)


# Not expressible: test_log_likelihood_estimate_timeseries_returns_correct_shape and
# test_log_likelihood_estimate_single_value_returns_correct_shape (our estimator returns per-object sums, not
# (objects, steps) tensors), test_histogram_estimate_raises_wrong_batch_size (log and rollouts are rows of one
# array: their batch sizes cannot differ), test_kernel_density_returns_correctly,
# test_kernel_density_raises_wrong_bandwidth and test_kernel_density_raises_wrong_batch_size (no KDE estimator).


# ------------------------------------------------------------------------------------------------------------
# trajectory_features_test.py
# ------------------------------------------------------------------------------------------------------------

def kinematic_features(x, y, heading, dt: float, valid=None):
    """The official ``compute_kinematic_features(x, y, z=0, heading, dt)`` of ``(N, T)`` tracks, with
    ``wosac_kinematics`` (history 0: every step): (speed, accel, angular speed, angular accel, use), the values
    ``(N, T)`` each and ``use`` ``(4, N, T)`` (the log's validity rule: ``compute_kinematic_validity``)."""
    x = np.atleast_2d(np.asarray(x, np.float64))
    traj = np.zeros((*x.shape, 5))
    traj[..., 0], traj[..., 1], traj[..., 2] = x, np.atleast_2d(y), np.atleast_2d(heading)
    valid = np.ones(x.shape, bool) if valid is None else np.asarray(valid, bool)
    values, use = wosac_kinematics(np.ascontiguousarray(traj), valid, float(dt), 0, np.ones(len(x), bool))
    return values[0], values[1], values[2], values[3], use


@pytest.mark.parametrize("shape", [(5,), (3, 5)], ids=["tensor1D", "tensor2D"])
def test_central_diff_returns_correct_broadcasted_values(shape):
    # official: TrajectoryFeaturesTest.test_central_diff_returns_correct_broadcasted_values (tensor1D, tensor2D),
    # through the speed and the angular speed of a track moving 1 / step. The official pad value is a parameter,
    # ours the NaN of compute_kinematic_features (nonzero_value: same case); tensor_length=1 has no central
    # difference (the official returns 2 pads for 1 step) and is not ported.
    t = np.broadcast_to(np.arange(shape[-1], dtype=np.float64), shape)
    t = np.atleast_2d(t)
    speed, _, angular_speed, _, _ = kinematic_features(t, np.zeros_like(t), t, dt=1.0)
    for d in (speed, angular_speed):
        assert np.isnan(d[:, 0]).all()
        assert np.isnan(d[:, -1]).all()
        np.testing.assert_allclose(d[:, 1:-1], 1.0, rtol=1e-12)


def test_central_diff_returns_correct_hardcoded_values():
    # official: TrajectoryFeaturesTest.test_central_diff_returns_correct_hardcoded_values (pad 7.0: ours NaN)
    t = np.array([0.0, 0.5, 1.5, 2.0, 3.5])
    speed, _, angular_speed, _, _ = kinematic_features(t, np.zeros_like(t), t, dt=1.0)
    for d in (speed[0], angular_speed[0]):
        np.testing.assert_allclose(d, [np.nan, 0.75, 0.75, 1.0, np.nan], rtol=1e-12)


@pytest.mark.parametrize("shape", [(5,), (3, 5)], ids=["tensor1D_false", "tensor2D"])
def test_central_logical_and_returns_correct_broadcasted_values(shape):
    # official: TrajectoryFeaturesTest.test_central_logical_and_returns_correct_broadcasted_values (pad False: the
    # speed validity of compute_kinematic_validity; tensor1D_true pads True, which ours never does)
    valid = np.ones(shape, bool).reshape(-1, shape[-1])
    *_, use = kinematic_features(np.zeros(valid.shape), np.zeros(valid.shape), np.zeros(valid.shape), 1.0, valid)
    speed_ok = use[0]
    assert not speed_ok[:, 0].any()
    assert not speed_ok[:, -1].any()
    assert speed_ok[:, 1:-1].all()


def test_central_logical_and_returns_correct_hardcoded_values():
    # official: TrajectoryFeaturesTest.test_central_logical_and_returns_correct_hardcoded_values: [T, F, T, T, F]
    # -> [pad, T, F, F, pad]; the pads are True there, False in compute_kinematic_validity (ours)
    valid = np.array([[True, False, True, True, False]])
    *_, use = kinematic_features(np.zeros((1, 5)), np.zeros((1, 5)), np.zeros((1, 5)), 1.0, valid)
    assert use[0, 0, 1:-1].tolist() == [True, False, False]


def test_compute_displacement_error_correctly_returns_shape_and_values():
    # official: TrajectoryFeaturesTest.test_compute_displacement_error_correctly_returns_shape_and_values: a
    # trajectory against itself has no error (ours: planar, and aggregated to ADE / FDE per rollout and object).
    # test_displacement_error_fails_on_wrong_dimensions (a TF shape error) is not ported.
    rng = np.random.default_rng(0)
    log = rng.uniform(size=(4, 5, 5))
    ade, fde, count = displacement(log[None].copy(), np.ones((1, 4, 5), bool), log, np.ones((4, 5), bool), 0)
    assert ade.shape == (1, 4)
    np.testing.assert_array_equal(ade, 0.0)
    np.testing.assert_array_equal(fde, 0.0)
    np.testing.assert_array_equal(count, 5)


def assert_nan_padding(lin_speed, lin_accel, ang_speed, ang_accel):
    """Speeds are NaN at the first and last step, accelerations at the first two and last two (the official
    central differences' padding)."""
    for d in (lin_speed, ang_speed):
        assert np.isnan(d[:1]).all(), "speed at the first step"
        assert np.isnan(d[-1:]).all(), "speed at the last step"
    for d in (lin_accel, ang_accel):
        assert np.isnan(d[:2]).all(), "acceleration at the first two steps"
        assert np.isnan(d[-2:]).all(), "acceleration at the last two steps"


def test_compute_kinematic_features_returns_const_speed():
    # official: TrajectoryFeaturesTest.test_compute_kinematic_features_returns_const_speed. Not expressible: the
    # speed magnitude sqrt(1 + 4 + 9) (it includes the z speed 3; our kinematics are planar).
    dt = 0.1
    speed, s0 = np.array([1.0, 2.0, 3.0, 5.0]), np.array([5.0, 7.0, 11.0, 0.0])
    t = np.arange(0.0, 2.0, dt)
    states = s0[None] + t[:, None] * speed[None]
    heading = (states[:, 3] + np.pi) % (2 * np.pi) - np.pi  # wrapped: the angular speed must unwrap it
    lin_speed, lin_accel, ang_speed, ang_accel, _ = kinematic_features(states[:, 0], states[:, 1], heading, dt)
    lin_speed, lin_accel, ang_speed, ang_accel = lin_speed[0], lin_accel[0], ang_speed[0], ang_accel[0]
    assert_nan_padding(lin_speed, lin_accel, ang_speed, ang_accel)
    np.testing.assert_allclose(lin_accel[2:-2], 0.0, atol=1e-6)
    np.testing.assert_allclose(ang_speed[1:-1], 5.0, rtol=1e-6)
    np.testing.assert_allclose(ang_accel[2:-2], 0.0, atol=1e-6)


def test_compute_kinematic_features_returns_const_linear_accel():
    # official: TrajectoryFeaturesTest.test_compute_kinematic_features_returns_const_linear_accel. Not expressible:
    # the acceleration magnitude sqrt(1 + 4 + 9) (it includes the z acceleration 3).
    dt = 0.1
    accel = np.array([1.0, 2.0, 3.0, 0.5])
    t = np.arange(0.0, 2.0, dt)
    states = 0.5 * t[:, None] ** 2 * accel[None]
    lin_speed, lin_accel, ang_speed, ang_accel, _ = kinematic_features(states[:, 0], states[:, 1], states[:, 3], dt)
    lin_speed, lin_accel, ang_speed, ang_accel = lin_speed[0], lin_accel[0], ang_speed[0], ang_accel[0]
    assert_nan_padding(lin_speed, lin_accel, ang_speed, ang_accel)
    np.testing.assert_allclose(ang_accel[2:-2], 0.5, rtol=1e-6)


def test_compute_kinematic_features_returns_hardcoded_values():
    # official: TrajectoryFeaturesTest.test_compute_kinematic_features_returns_hardcoded_values
    x = np.array([5.0, 6.0, 8.0, 9.0, 9.0])
    heading = np.array([0.0, 1.0, 3.0, 2.0, 0.0])
    lin_speed, lin_accel, ang_speed, ang_accel, _ = kinematic_features(x, np.zeros(5), heading, dt=1.0)
    np.testing.assert_allclose(lin_speed[0], [np.nan, 1.5, 1.5, 0.5, np.nan], rtol=1e-12)
    np.testing.assert_allclose(lin_accel[0], [np.nan, np.nan, -0.5, np.nan, np.nan], rtol=1e-12)
    np.testing.assert_allclose(ang_speed[0], [np.nan, 1.5, 0.5, -1.5, np.nan], rtol=1e-12)
    np.testing.assert_allclose(ang_accel[0], [np.nan, np.nan, -1.5, np.nan, np.nan], rtol=1e-12)


def test_compute_kinematic_validity_returns_correct_values():
    # official: TrajectoryFeaturesTest.test_compute_kinematic_validity_returns_correct_values
    valid = np.array([
        [True, True, True, True, True],
        [False, True, True, False, False],
        [False, True, False, True, False],
        [True, False, True, False, True],
    ])
    expected_speed = np.array([
        [False, True, True, True, False],
        [False, False, False, False, False],
        [False, False, True, False, False],
        [False, True, False, True, False],
    ])
    expected_accel = np.array([
        [False, False, True, False, False],
        [False, False, False, False, False],
        [False, False, False, False, False],
        [False, False, True, False, False],
    ])
    zeros = np.zeros(valid.shape)
    *_, use = kinematic_features(zeros, zeros, zeros, 0.1, valid)
    np.testing.assert_array_equal(use[0], expected_speed)  # linear speed
    np.testing.assert_array_equal(use[2], expected_speed)  # angular speed
    np.testing.assert_array_equal(use[1], expected_accel)  # linear acceleration
    np.testing.assert_array_equal(use[3], expected_accel)  # angular acceleration


# ------------------------------------------------------------------------------------------------------------
# interaction_features_test.py
# ------------------------------------------------------------------------------------------------------------

def nearest_object_distance(boxes, valid=None) -> np.ndarray:
    """``distance_to_nearest_object`` of box 0 over time: boxes ``(A, T, 5)`` x, y, heading, length, width (the
    sizes per object, from step 0); every box is an object of the WOSAC features. Returns ``(T,)``."""
    boxes = np.asarray(boxes, np.float32)
    agents = np.zeros((1, *boxes.shape[:2], 5), np.float32)
    agents[0, ..., :3] = boxes[..., :3]
    valid = np.ones(boxes.shape[:2], bool) if valid is None else np.asarray(valid, bool)
    f = interaction_features(torch.from_numpy(agents), torch.from_numpy(valid)[None],
                             torch.from_numpy(boxes[:, 0, 3:5].copy()), speed=torch.zeros(agents.shape[:3]),
                             wosac_objects=torch.ones(len(boxes), dtype=torch.bool))
    d = f["distance_to_nearest_object"]
    assert d.valid[0, 0].equal(torch.from_numpy(valid[0]))
    return d.value[0, 0].numpy()


@pytest.mark.parametrize("box1, box2, expected", [
    # boxes touching forward
    ((0.0, 0.0, 0.0, 2.0, 1.0), (3.0, 0.0, 0.0, 4.0, 1.0), 0.0),
    # boxes touching on the right
    ((0.0, 0.0, 0.0, 1.0, 1.0), (0.0, 1.5, 0.0, 1.0, 2.0), 0.0),
    # touching, box 1 rotated by 90 degrees
    ((0.0, 0.0, np.pi / 2, 2.0, 1.0), (1.0, 0.0, 0.0, 1.0, 1.0), 0.0),
    # 10 m apart on the x axis, box 1 rotated by 180 degrees
    ((6.0, 0.0, np.pi, 2.0, 1.0), (-6.0, 0.0, 0.0, 2.0, 1.0), 10.0),
], ids=["touching_forward", "touching_right", "touching_rotated", "10m_apart"])
def test_distance_to_nearest_returns_correct_distances(box1, box2, expected):
    # official: InteractionFeaturesTest.test_distance_to_nearest_returns_correct_distances (one step per box
    # configuration: our box sizes are fixed over time). The current official test passes
    # corner_rounding_factor=0, its earlier version the default; ours rounds by 0.7, which changes none of these
    # face-to-face distances.
    d = nearest_object_distance([[box1], [box2]])
    np.testing.assert_allclose(d, [expected], atol=1e-5)


@pytest.mark.parametrize("box2_valid", [True, False], ids=["valid_box2", "invalid_box2"])
def test_distance_to_nearest_object_handles_invalid_objects(box2_valid):
    # official: InteractionFeaturesTest.test_distance_to_nearest_object_handles_invalid_objects
    d = nearest_object_distance([[(6.0, 0.0, np.pi, 2.0, 1.0)], [(-6.0, 0.0, 0.0, 2.0, 1.0)]],
                                [[True], [box2_valid]])
    assert float(d[0]) == pytest.approx(10.0 if box2_valid else EXTREMELY_LARGE_DISTANCE, rel=1e-6)


def test_distance_to_nearest_object_selects_nearest():
    # official: InteractionFeaturesTest.test_distance_to_nearest_object_selects_nearest (corner_rounding_factor=0
    # in the current version, the default before: the face-to-face distances are the same with ours, 0.7)
    boxes = np.broadcast_to(np.array([[(0.0, 0.0, 0.0, 1.0, 1.0)], [(6.0, 0.0, 0.0, 1.0, 1.0)],
                                      [(0.0, 11.0, 0.0, 1.0, 1.0)]]), (3, 3, 5))
    valid = [[True, True, True], [True, True, False], [True, False, True]]
    np.testing.assert_allclose(nearest_object_distance(boxes, valid), [5.0, 5.0, 10.0], atol=1e-5)


def test_distance_to_nearest_object_with_corner_rounding():
    # official: InteractionFeaturesTest.test_distance_to_nearest_object_with_corner_rounding. Its factors 0, 0.5
    # and 1 cannot be set (ours is fixed at the official default, 0.7); its closed form at 0.7: the corner circles
    # of radii 0.7 and 1.4 of box 1 (2 x 2 at the origin) and box 2 (6 x 4 at (4, 3)) touching corner to corner,
    # centred at (0.3, 0.3) and (2.4, 2.4) (the installed official code gives 0.8698486 too).
    expected = math.hypot(2.4 - 0.3, 2.4 - 0.3) - 0.7 - 1.4
    boxes = np.broadcast_to(np.array([[(0.0, 0.0, 0.0, 2.0, 2.0)], [(4.0, 3.0, 0.0, 6.0, 4.0)]]), (2, 3, 5))
    np.testing.assert_allclose(nearest_object_distance(boxes), [expected] * 3, atol=1e-5)


def time_to_collision(center_xys, headings, sizes, speeds) -> np.ndarray:
    """``time_to_collision`` at the middle of 3 steps, built as the official test builds them: each box one step
    back and one ahead at its speed (official: the y offsets mirrored, which leaves the speed unchanged); speeds
    from central differences (``wosac_kinematics``, as the metric computes them); every box evaluated."""
    dt = 0.1
    xy, h = np.asarray(center_xys, np.float32), np.asarray(headings, np.float32)
    v, sizes = np.asarray(speeds, np.float32), np.asarray(sizes, np.float32)
    dx, dy = v * np.cos(h) * np.float32(dt), v * np.sin(h) * np.float32(dt)
    n = len(xy)
    agents = np.zeros((1, n, 3, 5), np.float32)
    agents[0, :, :, 0] = np.stack([xy[:, 0] - dx, xy[:, 0], xy[:, 0] + dx], axis=-1)
    agents[0, :, :, 1] = np.stack([xy[:, 1] + dy, xy[:, 1], xy[:, 1] - dy], axis=-1)
    agents[0, :, :, 2] = h[:, None]
    agents[0, :, :, 3], agents[0, :, :, 4] = (v * np.cos(h))[:, None], (v * np.sin(h))[:, None]
    valid = np.ones((1, n, 3), bool)
    kin, _ = wosac_kinematics(np.ascontiguousarray(agents[0], np.float64), valid[0], dt, 0, np.ones(n, bool))
    np.testing.assert_allclose(kin[0][:, 1], v, rtol=1e-5)
    f = interaction_features(torch.from_numpy(agents), torch.from_numpy(valid), torch.from_numpy(sizes),
                             speed=torch.from_numpy(kin[0])[None], wosac_objects=torch.ones(n, dtype=torch.bool))
    return f["time_to_collision"].value[0, :, 1].numpy()


TTC_CASES = {
    # 9 square boxes in a 3 x 3 grid
    "9 squares grid": (
        [[-3, 3], [0, 3], [3, 3], [-3, 0], [0, 0], [3, 0], [-3, -3], [0, -3], [3, -3]],
        [0] * 9,
        [[1, 1]] * 9,
        [10, 6, 1] * 3,
        [2 / 4, 2 / 5, MAX_TTC_SEC] * 3,
    ),
    # rectangles in a line
    "Lined up rectangles": (
        [[0, 0], [5, 0], [10, 0], [15, 0]],
        [0, 0, 0, 0],
        [[4, 2]] * 4,
        [6, 10, 3, 1],
        [MAX_TTC_SEC, 1 / 7, 1 / 2, MAX_TTC_SEC],
    ),
    "test ignore misaligned": (
        [[0, 0], [5, 0], [10, 0], [15, 0]],
        [0, MAX_HEADING_DIFF + 0.01, 0, MAX_HEADING_DIFF - 0.01],
        [[4, 2]] * 4,
        [10, 6, 3, 1],
        # closed form: (centre distance - ego length / 2 - rotated obstacle length / 2) / relative speed
        [6 / 7, MAX_TTC_SEC,
         (3 - math.cos(MAX_HEADING_DIFF - 0.01) * 2 - math.sin(MAX_HEADING_DIFF - 0.01)) / 2, MAX_TTC_SEC],
    ),
    "test ignore no overlap": (
        [[0, 0], [5, 2.1], [10, 1.1], [15, 0]],
        [0, 0, 0, 0],
        [[4, 2]] * 4,
        [10, 6, 3, 1],
        [6 / 7, 1 / 3, 1 / 2, MAX_TTC_SEC],
    ),
    "test ignore small misalignment with low overlap": (
        [[0, 0], [5, 2.5 - SMALL_OVERLAP_THRESHOLD], [10, -2.5 + SMALL_OVERLAP_THRESHOLD]],
        [0, MAX_HEADING_DIFF_FOR_SMALL_OVERLAP + 0.01, -MAX_HEADING_DIFF_FOR_SMALL_OVERLAP + 0.01],
        [[4, 2]] * 3,
        [6, 3, 1],
        [(8 - math.cos(MAX_HEADING_DIFF_FOR_SMALL_OVERLAP - 0.01) * 2
          - math.sin(MAX_HEADING_DIFF_FOR_SMALL_OVERLAP - 0.01)) / 5, MAX_TTC_SEC, MAX_TTC_SEC],
    ),
}


@pytest.mark.parametrize("case", list(TTC_CASES))
def test_time_to_collision_with_object_in_front(case):
    # official: InteractionFeaturesTest.test_time_to_collision_with_object_in_front (all 5 parametrisations; the
    # current version, with 3 steps and central-difference speeds)
    center_xys, headings, sizes, speeds, expected = TTC_CASES[case]
    np.testing.assert_allclose(time_to_collision(center_xys, headings, sizes, speeds), expected, rtol=1e-4,
                               atol=1e-5)


# Not expressible: test_distance_to_nearest_object_has_correct_shape and
# test_time_to_collision_with_object_in_front_has_correct_shape (the WOMD test scenario and submission).


# ------------------------------------------------------------------------------------------------------------
# map_metric_features_test.py
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(params=["points", "zero_size_boxes"])
def signed_distance(request):
    """The official ``_compute_signed_distance_to_polylines(xyzs, polylines)`` at z = 0: ``RoadEdges.signed_distance``
    of the points, or ``road_edge_features`` of zero-size boxes at the points (their 4 corners are the point)."""

    def points(polylines, xy):
        edges = build_road_edges([np.asarray(p, np.float64) for p in polylines])
        xy = np.asarray(xy, np.float64)
        if request.param == "points":
            return edges.signed_distance(xy)
        traj = torch.zeros((1, len(xy), 1, 5), dtype=torch.float64)
        traj[0, :, 0, :2] = torch.from_numpy(xy)
        f = road_edge_features(traj, torch.ones(traj.shape[:3], dtype=torch.bool), torch.zeros((len(xy), 2)),
                               torch.zeros(len(xy), dtype=torch.long),
                               SimpleNamespace(has_road_edges=True, road_edges=edges))
        assert f["distance_to_road_edge"].valid.all()
        return f["distance_to_road_edge"].value[0, :, 0].numpy()

    return points


def mesh(low: float, high: float, n: int) -> np.ndarray:
    """The official tests' query grid: ``meshgrid(x, x)`` of ``linspace(low, high, n)`` (float32), ``(n * n, 2)``."""
    x = np.linspace(low, high, n, dtype=np.float32)
    return np.stack(np.meshgrid(x, x), axis=-1).reshape(-1, 2)


def test_signed_distance_to_polyline_has_correct_sign(signed_distance):
    # official: MapMetricFeaturesTest.test_signed_distance_to_polyline_has_correct_sign
    d = signed_distance([[[0.0, 0.0], [0.0, 2.0]]], [[-1.0, 1.0], [2.0, 1.0]])
    np.testing.assert_allclose(d, [-1.0, 2.0], atol=1e-6)


def test_signed_distance_to_polylines_has_correct_magnitude(signed_distance):
    # official: MapMetricFeaturesTest.test_signed_distance_to_polylines_has_correct_magnitude
    d = signed_distance([[[0.0, 0.0], [2.0, 0.0]]], [[0.0, 1.0], [3.0, -1.0]])
    np.testing.assert_allclose(np.abs(d), [1.0, math.sqrt(2)], atol=1e-6)


def test_signed_distance_to_polylines_circle(signed_distance):
    # official: MapMetricFeaturesTest.test_signed_distance_to_polylines_circle (the official tolerance: a sampled
    # circle, 40 segments). The official test passes the ring as an open polyline, ours closes it (its ends meet).
    radius = 1.2
    xy = mesh(-2.0 * radius, 2.0 * radius, 10)
    t = np.linspace(0.0, 1.0, 41, dtype=np.float32)
    ring = np.stack([np.cos(t * np.float32(2 * np.pi)) * radius, np.sin(t * np.float32(2 * np.pi)) * radius], -1)
    d = signed_distance([ring], xy)
    np.testing.assert_allclose(d, np.linalg.norm(xy, axis=-1) - radius, rtol=0.02, atol=0.01)


def test_signed_distance_to_polylines_square(signed_distance):
    # official: MapMetricFeaturesTest.test_signed_distance_to_polylines_square (closed-form box distance)
    side = 0.8
    xy = mesh(-2.0, 2.0, 10)
    square = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1], [1, 1]], np.float32) * np.float32(side)
    d = signed_distance([square], xy)
    q = np.abs(xy.astype(np.float64)) - side
    expected = np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)
    np.testing.assert_allclose(d, expected, atol=1e-5)


def test_signed_distance_to_polylines_with_2_lines(signed_distance):
    # official: MapMetricFeaturesTest.test_signed_distance_to_polylines_with_2_lines
    xy = mesh(-1.0, 4.0, 10)
    d = signed_distance([[[0.0, 10.0], [0.0, -10.0]], [[2.0, -10.0], [2.0, 10.0]]], xy)
    np.testing.assert_allclose(d, np.abs(xy[:, 0] - 1.0) - 1.0, atol=1e-5)


def test_signed_distance_to_polylines_with_padded_lines(signed_distance):
    # official: MapMetricFeaturesTest.test_signed_distance_to_polylines_with_padded_lines (polylines of 4 and 2
    # points; the official zero-padding of the shorter one is a tensor layout, ours takes a list)
    xy = mesh(-1.0, 4.0, 10)
    d = signed_distance([[[0.0, 10.0], [0.0, 3.0], [0.0, -3.0], [0.0, -10.0]], [[2.0, -10.0], [2.0, 10.0]]], xy)
    np.testing.assert_allclose(d, np.abs(xy[:, 0] - 1.0) - 1.0, atol=1e-5)


# Not expressible: test_signed_distance_to_polylines_with_2_lines_with_different_z and
# test_signed_distance_to_polylines_with_2_lines_with_close_z (they pick the edge by altitude, z stretch; ours is
# planar), test_distance_to_road_edge_has_correct_shape and test_distance_to_road_edge_fails_on_missing_map (the
# WOMD test scenario; without road edges ours returns invalid features rather than raising).


# ------------------------------------------------------------------------------------------------------------
# traffic_light_features_test.py
# ------------------------------------------------------------------------------------------------------------

# Not expressible: test_red_light_violation_is_correct_on_synthetic_data moves the ADV of the binary WOMD test
# scenario through the stop point of its red light (the scenario is not available here). Its synthetic analogue
# is in the next section.


# ------------------------------------------------------------------------------------------------------------
# Analogues of the cases above that need the WOMD test scenario (or only check shapes): synthetic inputs whose
# expected values were computed with the installed official implementation (waymo-open-dataset-tf-2-12-0 1.6.7:
# compute_red_light_violation, compute_distance_to_road_edge, compute_distance_to_nearest_object and
# compute_time_to_collision_with_object_in_front), not published ones.
# ------------------------------------------------------------------------------------------------------------

def test_red_light_violation_synthetic_analogue():
    # analogue of TrafficLightFeaturesTest.test_red_light_violation_is_correct_on_synthetic_data: a vehicle passing
    # the stop point of its red light violates it, the others do not; including two consequences of the official
    # nearest-lane formula (distance to start - t (end - start)), which favours short segments.
    n_t = 10
    fine = np.stack([np.arange(0.0, 41.0), np.zeros(41)], axis=-1)  # 1 m segments
    lanes = [
        np.array([[0.0, 0.0], [20.0, 0.0], [40.0, 0.0]]),  # 0: signal 0, stop point (20, 0)
        fine + [0.0, 10.0],  # 1: no signal, 10 m to the left
        np.array([[0.0, -10.0], [40.0, -10.0]]),  # 2: no signal, one 40 m segment, 10 m to the right
        np.array([[0.0, -30.0], [40.0, -30.0]]),  # 3: signal 1, one 40 m segment, stop point (30, -30)
        fine + [0.0, -33.0],  # 4: no signal, 3 m right of lane 3
    ]
    red = np.zeros((2, n_t), bool)
    red[0, :6] = True  # signal 0: red for steps 0-5, then green
    red[1] = True  # signal 1: red throughout
    lights = TrafficLights(lane_segments=np.concatenate([np.concatenate([p[:-1], p[1:]], axis=1) for p in lanes]),
                           segment_lane=np.concatenate([np.full(len(p) - 1, k) for k, p in enumerate(lanes)]),
                           signal_lane=np.array([0, 3]), stop_point=np.array([[20.0, 0.0], [30.0, -30.0]]), red=red)
    t = np.arange(n_t, dtype=np.float64)
    x = np.stack([
        15.5 + t,  # A on lane 0: passes x = 20 between steps 4 and 5, red -> violation at 5
        np.minimum(10.0 + t, 19.5),  # B on lane 0: stops short of the stop point
        12.5 + t,  # C on lane 0: passes between steps 7 and 8, green
        15.5 + t,  # D on lane 1 (no signal): its short segments are nearest
        15.5 + t,  # E on lane 2: the official formula puts it on lane 0 (its far end is nearer) -> violation at 5
        25.5 + t,  # F on lane 3, passes x = 30 at red: the formula puts it on lane 4 -> no violation
        15.5 + t,  # G: as A, but invalid at step 5
    ])
    y = np.array([0.0, 0.0, 0.0, 10.0, -10.0, -30.0, 0.0])[:, None] * np.ones(n_t)
    valid = np.ones(x.shape, bool)
    valid[6, 5] = False
    out = lights.violations(np.stack([x, y], axis=-1)[None], valid[None])
    assert np.argwhere(out[0]).tolist() == [[0, 5], [4, 5]]  # official: the same


def test_distance_to_road_edge_synthetic_analogue():
    # analogue of MapMetricFeaturesTest.test_distance_to_road_edge_has_correct_shape with values: the most
    # off-road corner of boxes near a closed road (with a concave notch) and an open edge piece
    ring = np.array([[0.0, 0.0], [30.0, 0.0], [30.0, 12.0], [18.0, 12.0], [15.0, 8.0], [12.0, 12.0], [0.0, 12.0],
                     [0.0, 0.0]])
    open_edge = np.array([[40.0, 20.0], [40.0, 0.0], [45.0, -5.0]])  # road on its left: east of it
    boxes = np.array([  # x, y, heading, length, width
        [5.0, 6.0, 0.0, 4.5, 2.0],  # well inside
        [29.0, 6.0, 0.3, 4.5, 2.0],  # nose past the east edge
        [15.0, 9.0, 1.2, 4.5, 2.0],  # at the notch (concave vertex)
        [1.0, 1.0, -2.5, 4.5, 2.0],  # across the south-west corner (convex)
        [35.0, 6.0, 0.0, 4.0, 2.0],  # between the ring and the open edge
        [41.0, 2.0, -0.8, 4.0, 1.8],  # near the open edge's bend
        [47.0, -6.0, 0.5, 4.0, 1.8],  # beyond its open end
    ])
    traj = torch.zeros((1, len(boxes), 1, 5), dtype=torch.float64)
    traj[0, :, 0, :3] = torch.from_numpy(boxes[:, :3])
    f = road_edge_features(traj, torch.ones(traj.shape[:3], dtype=torch.bool), torch.from_numpy(boxes[:, 3:]),
                           torch.zeros(len(boxes), dtype=torch.long),
                           SimpleNamespace(has_road_edges=True, road_edges=build_road_edges([ring, open_edge])))
    official = [-2.75, 1.4450264, 1.98228, 1.4010453, 3.0, 1.039032, 2.8306577]
    np.testing.assert_allclose(f["distance_to_road_edge"].value[0, :, 0].numpy(), official, atol=1e-5)


def test_interaction_features_synthetic_analogue():
    # analogue of InteractionFeaturesTest's shape tests with values: rounded-box distances (one overlap) and times
    # to collision of boxes in traffic, at the middle of 3 steps
    objects = np.array([  # x, y, heading, length, width, speed (along the heading)
        [0.0, 0.0, 0.0, 4.5, 2.0, 12.0],
        [8.0, 0.6, 0.2, 4.0, 1.8, 7.0],  # ahead, slightly offset and turned
        [3.0, 1.0, -0.4, 4.2, 1.9, 9.0],  # overlapping object 0 at its front left
        [-7.0, -0.5, 0.1, 5.0, 2.1, 15.0],  # behind object 0
        [20.0, -1.0, 2.8, 4.4, 1.9, 6.0],  # oncoming
        [9.5, 6.0, 1.1, 0.8, 0.8, 1.5],  # a pedestrian-sized box
    ])
    dt, n = 0.1, len(objects)
    steps = np.array([-1.0, 0.0, 1.0]) * dt
    agents = np.zeros((1, n, 3, 5), np.float32)
    agents[0, :, :, 0] = objects[:, :1] + (objects[:, 5] * np.cos(objects[:, 2]))[:, None] * steps
    agents[0, :, :, 1] = objects[:, 1:2] + (objects[:, 5] * np.sin(objects[:, 2]))[:, None] * steps
    agents[0, :, :, 2] = objects[:, 2:3]
    valid = np.ones((1, n, 3), bool)
    kin, _ = wosac_kinematics(np.ascontiguousarray(agents[0], np.float64), valid[0], dt, 0, np.ones(n, bool))
    f = interaction_features(torch.from_numpy(agents), torch.from_numpy(valid),
                             torch.from_numpy(objects[:, 3:5].astype(np.float32)), speed=torch.from_numpy(kin[0])[None],
                             wosac_objects=torch.ones(n, dtype=torch.bool))
    official_distance = [-0.4406007, 0.8788098, -0.4406007, 2.2428622, 7.8686514, 3.7992039]
    official_ttc = [0.7222129, 5.0, 0.2511114, 0.72545123, 5.0, 5.0]
    np.testing.assert_allclose(f["distance_to_nearest_object"].value[0, :, 1].numpy(), official_distance, atol=1e-5)
    assert f["collision"].value[0, :, 1].tolist() == [True, False, True, False, False, False]
    np.testing.assert_allclose(f["time_to_collision"].value[0, :, 1].numpy(), official_ttc, atol=1e-5)
