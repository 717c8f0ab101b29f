"""Safety of the core: atomic writes, caches that never serve another map's data, stale states refused, checkpoint
checksums."""

from __future__ import annotations

import gc
import json
import struct

import numpy as np
import pytest
import torch

from envs import sim
from envs.errors import CheckpointChecksumError, StaleStateError
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


def test_checkpoint_save_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    from agents.checkpoint import load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "m.safetensors", "tiny", {"w": 1}, {"x": torch.ones(3)})

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, "tiny", {"w": 2}, {"x": torch.zeros(3)})
    assert load_checkpoint(path)[0] == {"w": 1} and _leftovers(tmp_path) == []


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


# ---- checkpoint checksums --------------------------------------------------------------------------------------

def _flip_tensor_byte(src, dst, tensor: str, offset: int = 3) -> None:
    """Copy ``src`` to ``dst`` with one byte of ``tensor``'s data flipped (the header stays valid)."""
    data = bytearray(src.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    start = json.loads(data[8:8 + n])[tensor]["data_offsets"][0]
    data[8 + n + start + offset] ^= 0x40
    dst.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_checkpoints_tensors_raises_a_typed_error_naming_the_file(tmp_path):
    from agents.checkpoint import load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "good.safetensors", "tiny", {"width": 4},
                           {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4)})
    config, tensors, _ = load_checkpoint(path, expected_agent="tiny")
    assert config == {"width": 4} and torch.equal(tensors["w"], torch.arange(12.0).reshape(3, 4))
    bad = tmp_path / "bad.safetensors"
    _flip_tensor_byte(path, bad, "w")
    from safetensors.torch import load_file

    assert not torch.equal(load_file(str(bad))["w"], tensors["w"])  # it still parses: only the checksum tells
    with pytest.raises(CheckpointChecksumError, match="bad.safetensors"):
        load_checkpoint(bad, expected_agent="tiny")


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    """Files saved before checksums existed (users' runs) have none: they load, unverified."""
    from safetensors.torch import save_file

    from agents.checkpoint import FORMAT, load_checkpoint

    path = tmp_path / "legacy.safetensors"
    save_file({"x": torch.ones(2)}, str(path),
              metadata={"format": FORMAT, "agent": "tiny", "config": "{}", "extra": "{}"})
    config, tensors, extra = load_checkpoint(path, expected_agent="tiny")
    assert config == {} and extra == {} and torch.equal(tensors["x"], torch.ones(2))


def test_the_checksum_covers_order_independent_content():
    from agents.checkpoint import checkpoint_checksum

    meta = {"format": "f", "agent": "a", "config": "{}"}
    a = {"x": torch.zeros(2), "y": torch.ones(3)}
    assert checkpoint_checksum(meta, a) == checkpoint_checksum(dict(reversed(meta.items())), dict(reversed(a.items())))
    assert checkpoint_checksum(meta, a) != checkpoint_checksum(meta, {"x": torch.zeros(2), "y": torch.ones(3).double()})
    assert checkpoint_checksum(meta, a) != checkpoint_checksum(meta, {"x": torch.zeros(1, 2), "y": torch.ones(3)})
    assert checkpoint_checksum(meta, a) != checkpoint_checksum({**meta, "config": '{"k": 1}'}, a)


def test_the_bundled_weights_carry_a_checksum_and_a_flipped_copy_is_refused(tmp_path):
    from agents.checkpoint import CHECKSUM_KEY, load_checkpoint
    from agents.smart import PRETRAINED

    src = PRETRAINED["towns-nano"]
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        assert f.metadata()[CHECKSUM_KEY].startswith("sha256:")
        name = sorted(f.keys())[0]
    load_checkpoint(src, expected_agent="smart")
    bad = tmp_path / "nano_copy.safetensors"
    _flip_tensor_byte(src, bad, name)
    with pytest.raises(CheckpointChecksumError, match="nano_copy.safetensors"):
        load_checkpoint(bad, expected_agent="smart")
