"""Safety of the core: atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs.fileio import atomic_write
from tests.scenes import straight_road


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
