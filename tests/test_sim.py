"""Simulator core: geometry, dynamics, the batched step and per-step metrics on hand-built cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from envs import sim
from envs.dynamics import DeltaLocal, InvertibleBicycle, StatePose, Unicycle, make_dynamics
from envs.errors import EmptySceneError, NoEgoError, UnknownNameError
from envs.geometry import box_corners, boxes_overlap, to_local, to_world, wrap_angle
from envs.metrics import compute_step_metrics, compute_step_metrics_and_pairs
from envs.types import Action, AgentType
from tests.scenes import make_scene, straight_road


def _metrics_at_start(tracks, **kw):
    state = sim.reset([make_scene(tracks, **kw)], start_step=10, controlled="none")
    return compute_step_metrics(state)


def _pairs_at_start(tracks, **kw):
    state = sim.reset([make_scene(tracks, **kw)], start_step=10, controlled="none")
    metrics, pairs = compute_step_metrics_and_pairs(state)
    assert torch.equal(metrics["collision"], compute_step_metrics(state, ["collision"])["collision"])
    return pairs


# ---- box overlap ---------------------------------------------------------------------------------------------

def _box(x, y, h, length=4.0, width=2.0):
    return box_corners(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64),
                       torch.tensor(h, dtype=torch.float64), torch.tensor(length, dtype=torch.float64),
                       torch.tensor(width, dtype=torch.float64))


@pytest.mark.parametrize(("other", "expected"), [
    ((4.0, 0.0, 0.0), False),  # touching end to end: shared edge, zero-area intersection
    ((3.9, 0.0, 0.0), True),  # 0.1 m overlap
    ((0.0, 2.0, 0.0), False),  # touching side by side
    ((0.0, 1.99, 0.0), True),
    ((10.0, 0.0, 0.0), False),  # separated
    ((2.0 + math.sqrt(2) + 0.05, 0.0, math.pi / 4), False),  # rotated 45 degrees, corner just short of the face
    ((2.0 + math.sqrt(2) - 0.05, 0.0, math.pi / 4), True),  # corner 5 cm inside the face
])
def test_box_overlap_hand_built(other, expected):
    # The rotated 2 x 2 box's corner sits at half its diagonal (sqrt 2) in front of its centre.
    a = _box(0.0, 0.0, 0.0)
    b = _box(*other, length=2.0 if other[2] else 4.0, width=2.0)
    assert bool(boxes_overlap(a, b)) is expected
    assert bool(boxes_overlap(b, a)) is expected


finite = st.floats(-50, 50, allow_nan=False)
angle = st.floats(-math.pi, math.pi, allow_nan=False)
size = st.floats(0.5, 8.0)


@settings(max_examples=300, deadline=None)
@given(finite, finite, angle, size, size, finite, finite, angle, size, size, finite, finite, angle)
def test_box_overlap_symmetric_and_rigid_invariant(x1, y1, h1, l1, w1, x2, y2, h2, l2, w2, tx, ty, rot):
    a = _box(x1, y1, h1, l1, w1)
    b = _box(x2, y2, h2, l2, w2)
    hit = bool(boxes_overlap(a, b))
    assert hit == bool(boxes_overlap(b, a))
    c, s = math.cos(rot), math.sin(rot)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    shift = torch.tensor([tx, ty], dtype=torch.float64)
    a2, b2 = a @ rotation.T + shift, b @ rotation.T + shift
    # Invariance may flip only for boxes within rounding of touching; rule that band out explicitly.
    hit2 = bool(boxes_overlap(a2, b2))
    if hit != hit2:
        shrink = bool(boxes_overlap(_box(x1, y1, h1, l1 * 0.999, w1 * 0.999), _box(x2, y2, h2, l2 * 0.999, w2 * 0.999)))
        grow = bool(boxes_overlap(_box(x1, y1, h1, l1 * 1.001, w1 * 1.001), _box(x2, y2, h2, l2 * 1.001, w2 * 1.001)))
        assert shrink != grow, "overlap changed under a rigid transform for boxes that are not touching"
    # Concentric boxes always overlap.
    assert bool(boxes_overlap(a, _box(x1, y1, h2, l2, w2)))


@settings(max_examples=100, deadline=None)
@given(finite, finite, angle, st.lists(st.tuples(finite, finite), min_size=1, max_size=5))
def test_local_world_round_trip(ox, oy, h, pts):
    p = torch.tensor(pts, dtype=torch.float64)
    origin = torch.tensor([ox, oy], dtype=torch.float64)
    back = to_world(to_local(p, origin, torch.tensor(h, dtype=torch.float64)), origin,
                    torch.tensor(h, dtype=torch.float64))
    torch.testing.assert_close(back, p, atol=1e-9, rtol=0)


# ---- collision and off-road metrics in the step ------------------------------------------------------------

def test_collision_metric_names_the_pair():
    m = _metrics_at_start([dict(x0=10, y0=-1.75), dict(x0=14.4, y0=-1.75), dict(x0=30, y0=-1.75)])
    assert m["collision"].tolist() == [[True, True, False]]
    assert _pairs_at_start([dict(x0=10, y0=-1.75), dict(x0=14.4, y0=-1.75), dict(x0=30, y0=-1.75)]).tolist() == \
        [[0, 0, 1]]
    m = _metrics_at_start([dict(x0=10, y0=-1.75), dict(x0=14.5, y0=-1.75)])  # exactly touching (4.5 m boxes)
    assert m["collision"].tolist() == [[False, False]]


def test_invalid_agents_never_collide():
    m = _metrics_at_start([dict(x0=10, y0=-1.75), dict(x0=10, y0=-1.75, steps=slice(20, 91))])
    assert m["collision"].tolist() == [[False, False]]


def test_offroad_on_a_hand_built_road():
    # Road: y in [-3.5, 3.5]. Width-2 boxes: centred at y=-1.75 (inside), -2.6 (0.1 m over), -6 (far out).
    m = _metrics_at_start([dict(x0=50, y0=-1.75), dict(x0=100, y0=-2.6), dict(x0=150, y0=-6.0),
                           dict(x0=20, y0=-6.0, type=AgentType.PEDESTRIAN, length=0.5, width=0.5)])
    assert m["offroad"].tolist() == [[False, True, True, False]]  # pedestrians are never "off-road"
    d = m["road_edge_distance"][0]
    assert d[0].item() == pytest.approx(-0.75, abs=0.15)
    assert d[1].item() == pytest.approx(0.1, abs=0.15)
    assert d[2].item() == pytest.approx(3.5, abs=0.15)


# ---- dynamics -----------------------------------------------------------------------------------------------

def _states(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, 5, generator=g, dtype=torch.float64)
    x, y = s[:, 0] * 100, s[:, 1] * 100
    h = (s[:, 2] - 0.5) * 2 * math.pi
    v = 1.0 + s[:, 3] * 20
    return torch.stack([x, y, h, v * torch.cos(h), v * torch.sin(h)], dim=-1)


@pytest.mark.parametrize("dyn", [DeltaLocal(), InvertibleBicycle(), Unicycle(), StatePose()])
def test_inverse_of_forward_is_the_action(dyn):
    s = _states()
    g = torch.Generator().manual_seed(1)
    low, high = dyn.bounds(dtype=torch.float64)
    if isinstance(dyn, StatePose):
        low, high = torch.tensor([-50.0, -50.0, -3.0], dtype=torch.float64), torch.tensor([150, 150, 3.0])
    a = low + (high - low) * torch.rand(64, dyn.action_dim, generator=g, dtype=torch.float64)
    if isinstance(dyn, InvertibleBicycle | Unicycle):
        a[:, 0] = a[:, 0].clamp(min=-9.0)  # keep the speed positive so curvature is observable
    nxt = dyn.forward(s, a, 0.1)
    torch.testing.assert_close(dyn.inverse(s, nxt, 0.1), a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dyn", [DeltaLocal(), StatePose()])
def test_forward_of_inverse_reproduces_poses_exactly(dyn):
    s0 = _states(seed=2)
    s1 = s0.clone()
    s1[:, :2] += torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    s1[:, 2] = wrap_angle(s0[:, 2] + 0.1)
    out = dyn.forward(s0, dyn.inverse(s0, s1, 0.1), 0.1)
    torch.testing.assert_close(out[:, :2], s1[:, :2], atol=1e-9, rtol=0)
    torch.testing.assert_close(wrap_angle(out[:, 2] - s1[:, 2]), torch.zeros(64, dtype=torch.float64),
                               atol=1e-9, rtol=0)  # the heading too (compared modulo 2 pi)


def test_bicycle_reproduces_a_constant_turn_exactly():
    # A circle of radius 20 m at 10 m/s: the bicycle's own motion model, so the round trip is exact.
    dyn = InvertibleBicycle()
    start = torch.tensor([[0.0, 0.0, 0.0, 10.0, 0.0]], dtype=torch.float64)
    states = [start]
    for _ in range(30):
        states.append(dyn.forward(states[-1], torch.tensor([[0.0, 1 / 20]], dtype=torch.float64), 0.1))
    log = torch.cat(states)
    actions = dyn.inverse(log[:-1], log[1:], 0.1)
    torch.testing.assert_close(actions, torch.tensor([[0.0, 0.05]] * 30, dtype=torch.float64), atol=1e-9, rtol=0)
    heading_after_30 = 30 * 0.1 * 10 / 20
    assert log[-1, 2].item() == pytest.approx(heading_after_30)


def test_unicycle_turns_on_the_spot_and_reproduces_a_constant_turn():
    dyn = Unicycle()
    still = torch.tensor([[3.0, 4.0, 0.5, 0.0, 0.0]], dtype=torch.float64)
    spun = dyn.forward(still, torch.tensor([[0.0, 1.0]], dtype=torch.float64), 0.1)
    torch.testing.assert_close(spun, torch.tensor([[3.0, 4.0, 0.6, 0.0, 0.0]], dtype=torch.float64))
    # 10 m/s at 0.5 rad/s: a circle of radius 20 m; the inverse of the track is the action, exactly
    states = [torch.tensor([[0.0, 0.0, 0.0, 10.0, 0.0]], dtype=torch.float64)]
    for _ in range(30):
        states.append(dyn.forward(states[-1], torch.tensor([[0.0, 0.5]], dtype=torch.float64), 0.1))
    log = torch.cat(states)
    torch.testing.assert_close(dyn.inverse(log[:-1], log[1:], 0.1),
                               torch.tensor([[0.0, 0.5]] * 30, dtype=torch.float64), atol=1e-9, rtol=0)
    assert log[-1, 2].item() == pytest.approx(1.5)
    stop = dyn.forward(states[0], torch.tensor([[-200.0, 0.0]], dtype=torch.float64), 0.1)
    assert stop[0, 3].item() == 0.0 and stop[0, 0].item() == pytest.approx(0.5)  # brakes to a stop, no reverse


def test_make_dynamics_unknown_name():
    with pytest.raises(UnknownNameError, match="Did you mean 'bicycle'"):
        make_dynamics("bicylce")


# ---- the batched step --------------------------------------------------------------------------------------

def test_log_replay_reproduces_the_log_and_validity():
    scene = make_scene([dict(x0=10, y0=-1.75, speed=10), dict(x0=40, y0=1.75, heading=math.pi, speed=5,
                                                                steps=slice(30, 60))])
    state = sim.reset([scene], start_step=10, controlled="none")
    none = Action(torch.zeros(1, 2, 2), torch.zeros(1, 2, dtype=torch.bool))
    for _ in range(80):
        state = sim.step(state, none, InvertibleBicycle())
    assert state.t.item() == 90
    torch.testing.assert_close(state.traj, state.log)
    assert torch.equal(state.valid, state.log_valid)
    state = sim.step(state, none, InvertibleBicycle())  # at the end of the log nothing moves
    assert state.t.item() == 90


def test_controlled_agents_follow_actions_and_stay_valid():
    scene = make_scene([dict(x0=10, y0=-1.75, speed=10, steps=slice(0, 40))])
    state = sim.reset([scene], start_step=10, controlled="all")
    brake = Action(torch.tensor([[[-5.0, 0.0]]]), torch.ones(1, 1, dtype=torch.bool))
    for _ in range(40):
        state = sim.step(state, brake, InvertibleBicycle())
    # Logged track ends at step 39, the controlled agent lives on; it stopped after 2 s and stays stopped.
    assert state.valid[0, 0, :51].all()
    speed = state.traj[0, 0, 10:51, 3]
    assert speed[20:].abs().max() == 0  # stopped after 2 s, and braking never reverses it
    assert speed[19].item() == pytest.approx(0.5, abs=1e-5)


def test_batched_scenes_are_independent():
    s1 = make_scene([dict(x0=10, y0=-1.75, speed=10)], scene_id="a")
    s2 = make_scene([dict(x0=100, y0=1.75, heading=math.pi, speed=5), dict(x0=150, y0=1.75, speed=0)],
                    scene_id="b")
    both = sim.reset([s1, s2], start_step=10, controlled="all")
    alone = sim.reset([s2], start_step=10, controlled="all")
    act_both = Action(torch.tensor([[[1.0, 0.01], [0.0, 0.0]], [[-1.0, 0.02], [2.0, 0.0]]]),
                      both.controlled.clone())
    act_alone = Action(act_both.data[1:], alone.controlled.clone())
    for _ in range(20):
        both = sim.step(both, act_both, InvertibleBicycle())
        alone = sim.step(alone, act_alone, InvertibleBicycle())
    torch.testing.assert_close(both.traj[1:, :2], alone.traj)


def test_reset_errors():
    with pytest.raises(EmptySceneError, match="at least one scene"):
        sim.reset([])
    empty = make_scene([])
    with pytest.raises(EmptySceneError, match="no agents"):
        sim.reset([empty], controlled="none")
    no_ego = make_scene([dict(x0=0, y0=0, steps=slice(20, 91))])
    with pytest.raises(NoEgoError, match="no ego agent valid at step 10"):
        sim.reset([no_ego], start_step=10, controlled="ego")
    with pytest.raises(UnknownNameError, match="control mode"):
        sim.reset([make_scene([dict(x0=0, y0=0)])], controlled="everyone")


def test_progress_and_log_divergence():
    scene = make_scene([dict(x0=10, y0=-1.75, speed=10)], map_data=straight_road())
    state = sim.reset([scene], start_step=10, controlled="all")
    stop = Action(torch.tensor([[[0.0, 0.0]]]), torch.ones(1, 1, dtype=torch.bool))
    for _ in range(10):  # the controlled agent keeps 10 m/s: identical to the log
        state = sim.step(state, stop, InvertibleBicycle())
    m = compute_step_metrics(state)
    assert m["progress"].item() == pytest.approx(20.0, abs=1e-3)  # 2 s at 10 m/s
    assert m["log_divergence"].item() == pytest.approx(0.0, abs=1e-3)
    brake = Action(torch.tensor([[[-10.0, 0.0]]]), torch.ones(1, 1, dtype=torch.bool))
    state = sim.step(state, brake, InvertibleBicycle())
    m = compute_step_metrics(state)
    # One step at 10 m/s braking 10 m/s^2 covers 0.95 m instead of the log's 1 m.
    assert m["log_divergence"].item() == pytest.approx(0.05, abs=1e-4)
    assert m["progress"].item() == pytest.approx(20.95, abs=1.0)  # nearest logged step: 21.0 m


def test_mixed_controls_refuse_double_driving():
    scene = make_scene([dict(x0=10, y0=-1.75, speed=10)])
    state = sim.reset([scene], start_step=10, controlled="all")
    a = Action(torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="two controls"):
        sim.step(state, a, InvertibleBicycle(), more=[(a, InvertibleBicycle())])
    np.testing.assert_equal(state.t.item(), 10)


def test_resample_routes_exact():
    from envs.sim import resample_routes

    log = np.zeros((1, 3, 6, 5), np.float32)
    valid = np.zeros((1, 3, 6), bool)
    log[0, 0, :, 0] = [0, 1, 2, 3, 4, 5]  # straight, 1 m per step
    valid[0, 0] = True
    log[0, 1, 2:5, 0] = 10.0  # standing still
    valid[0, 1, 2:5] = True
    log[0, 2, [0, 1, 4, 5], 1] = [0.0, 2.5, 2.5, 5.0]  # a gap in the middle adds no length
    valid[0, 2, [0, 1, 4, 5]] = True
    route, length = resample_routes(log, valid)
    assert length.tolist() == [[6, 1, 6]]
    np.testing.assert_allclose(route[0, 0], np.stack([np.arange(6), np.zeros(6)], -1))
    np.testing.assert_allclose(route[0, 1, 0], [10, 0])
    np.testing.assert_allclose(route[0, 2], np.stack([np.zeros(6), np.arange(6)], -1))
