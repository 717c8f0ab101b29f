"""Safety of the core: atomic writes, caches that never serve another map's data, stale states refused."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from envs import sim
from envs.errors import StaleStateError
from envs.fileio import atomic_write
from envs.types import Action, PolylineType
from tests.scenes import make_map, make_scene, straight_road


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ---- atomic writes ---------------------------------------------------------------------------------------------

def test_atomic_write_replaces_only_when_the_write_finishes(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.exists() and not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and _leftovers(target.parent) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, error):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half a fi")
            raise error
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):  # no old file: none appears
        with atomic_write(tmp_path / "absent.bin") as tmp:
            raise RuntimeError
    assert not (tmp_path / "absent.bin").exists() and _leftovers(tmp_path) == []


def _fail_after_writing(f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a zip")
    raise OSError("disk full")


def test_the_writers_that_used_to_leave_temporary_files_no_longer_do(tmp_path, monkeypatch):
    """save_map_index, save_rollouts and the scene cache's index used to leave their temporary file behind when
    the write failed; every writer now goes through atomic_write."""
    from envs.map_index import build_map_index, save_map_index
    from training import rollouts

    ix_path = tmp_path / "ix.npz"
    ix_path.write_bytes(b"old index")
    monkeypatch.setattr(np, "savez_compressed", _fail_after_writing)
    with pytest.raises(OSError, match="disk full"):
        save_map_index(ix_path, build_map_index(straight_road()))
    assert ix_path.read_bytes() == b"old index" and _leftovers(tmp_path) == []

    class _Rollouts:  # save_rollouts reads these before it writes
        scene_id = "scene"
        sim = log = torch.zeros(1, 1, 3, 5)
        sim_valid = log_valid = torch.ones(1, 1, 3, dtype=torch.bool)
        agent_ids = np.array(["a"])
        agent_type = torch.zeros(1, dtype=torch.long)
        extent = torch.ones(1, 2)
        dt, history_steps, ego_index = 0.1, 1, 0

    monkeypatch.setattr(rollouts, "_map_arrays", lambda r: {})
    (tmp_path / "scene.npz").write_bytes(b"old rollouts")
    with pytest.raises(OSError, match="disk full"):
        rollouts.save_rollouts(_Rollouts(), tmp_path)
    assert (tmp_path / "scene.npz").read_bytes() == b"old rollouts" and _leftovers(tmp_path) == []


# ---- caches keyed by map id ------------------------------------------------------------------------------------

def _two_maps():
    east = make_map([(np.array([[0.0, 0.0], [100.0, 0.0]]), PolylineType.LANE_CENTER)], map_id="test:east")
    north = make_map([(np.array([[0.0, 0.0], [0.0, 100.0]]), PolylineType.LANE_CENTER)], map_id="test:north")
    return east, north


def test_idm_lane_index_never_serves_another_maps_entry_even_when_ids_collide(monkeypatch):
    import agents.idm as idm

    monkeypatch.setattr(idm, "id", lambda obj: 12345, raising=False)  # every object "has the same id()"
    east, north = _two_maps()
    a, b = idm._LaneIndex.of(east), idm._LaneIndex.of(north)
    assert a is not b
    np.testing.assert_array_equal(a.flat, east.points)
    np.testing.assert_array_equal(b.flat, north.points)
    assert idm._LaneIndex.of(east) is a  # still cached per map
    # A map with the same name but other content (a new object, e.g. another test's fixture) gets its own.
    twin = make_map([(np.array([[5.0, 5.0], [9.0, 5.0]]), PolylineType.LANE_CENTER)], map_id="test:east")
    np.testing.assert_array_equal(idm._LaneIndex.of(twin).flat, twin.points)


def test_idm_lane_index_of_a_dead_map_is_not_served_to_its_successor():
    import agents.idm as idm

    old = make_map([(np.array([[0.0, 0.0], [100.0, 0.0]]), PolylineType.LANE_CENTER)], map_id="test:reused")
    idm._LaneIndex.of(old)
    del old
    gc.collect()  # its id() may now be reused by the next map
    new = make_map([(np.array([[0.0, 0.0], [0.0, -50.0]]), PolylineType.LANE_CENTER)], map_id="test:reused")
    np.testing.assert_array_equal(idm._LaneIndex.of(new).flat, new.points)


def test_observation_chunk_centres_never_serve_another_map_batch(monkeypatch):
    import envs.observation as obs

    monkeypatch.setattr(obs, "id", lambda obj: 12345, raising=False)
    east, north = _two_maps()
    batches = [sim.stack_maps([m]) for m in (east, north, straight_road(map_id="test:east"))]
    for mb in batches * 2:
        w = mb.chunk_mask.float()[..., None]
        expected = (mb.chunks * w).sum(-2) / w.sum(-2).clamp(min=1)
        assert torch.equal(obs._chunk_centres(mb), expected)


# ---- stale states ----------------------------------------------------------------------------------------------

def _state():
    from envs.dynamics import InvertibleBicycle

    scene = make_scene([dict(x0=10, y0=-1.75, speed=10), dict(x0=40, y0=1.75, speed=8, heading=np.pi)])
    state = sim.reset([scene], start_step=10, controlled="all")
    action = Action(torch.tensor([[[1.0, 0.0], [-1.0, 0.01]]]), state.controlled.clone())
    return state, action, InvertibleBicycle()


def test_stepping_a_state_twice_raises_and_says_to_clone():
    state, action, dyn = _state()
    first = sim.step(state, action, dyn)
    snapshot = first.traj.clone(), first.valid.clone()
    with pytest.raises(StaleStateError, match=r"clone\(\)"):
        sim.step(state, action, dyn)
    # The refused step wrote nothing: the newer state is intact and steps on.
    assert torch.equal(first.traj, snapshot[0]) and torch.equal(first.valid, snapshot[1])
    second = sim.step(first, action, dyn)
    assert int(second.t[0]) == 12
    with pytest.raises(StaleStateError):
        sim.step(first, action, dyn)


def test_stepping_a_clone_branches_without_touching_the_original():
    state, action, dyn = _state()
    branch = state.clone()
    first = sim.step(state, action, dyn)
    kept = first.traj.clone()
    other = Action(torch.zeros_like(action.data), action.valid)
    alt = sim.step(branch, other, dyn)  # a clone of an unstepped state: fine, and independent
    assert torch.equal(first.traj, kept)
    assert not torch.equal(alt.current, first.current)
    again = sim.step(first.clone(), action, dyn)  # a clone of a state that is about to be stepped: fine too
    assert torch.equal(first.traj, kept)
    assert torch.equal(sim.step(first, action, dyn).current, again.current)
