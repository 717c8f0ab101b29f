"""File writing that never leaves a half-written file behind: ``atomic_write``.

Every file trafficgym writes for later reading (scene and map caches, map indices, checkpoints, saved rollouts,
repaired dataset files) goes through ``atomic_write``: the content is written to a temporary file in the target's
directory, which is renamed over the target only once the write has finished. A reader sees the old file or the
new one, never a mix; a write that fails (an exception, a full disk, Ctrl-C) deletes its temporary file and
leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file's path next to ``path`` (parent directories are created); when the block ends
    normally the temporary file replaces ``path`` (``os.replace``, atomic on one file system), when it raises the
    temporary file is deleted and ``path`` keeps its old content (or stays absent).

    The temporary file exists (empty, mode 0600 as ``tempfile.mkstemp`` makes it) when the block starts; write it
    by name::

        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez would append ".npz" to a name
        with atomic_write(path) as tmp:
            safetensors.torch.save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful replace
