"""Checkpoints: one ``.safetensors`` file holding the tensors and, in its metadata, the JSON needed to rebuild
the agent (its registered name and constructor config). Loading never executes code (no pickle).

The metadata also holds a checksum (``checksum``: sha256 of the other metadata and of every tensor's name, dtype,
shape and bytes), verified on load: a damaged file (a flipped bit, a bad copy) raises ``CheckpointChecksumError``
instead of loading and driving with corrupt weights. Files saved before checksums existed have none and load
unverified.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from envs.errors import CheckpointChecksumError, CheckpointError
from envs.fileio import atomic_write

FORMAT = "trafficgym-checkpoint-v1"
CHECKSUM_KEY = "checksum"


def checkpoint_checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` of the metadata (every key but ``CHECKSUM_KEY``) and of each tensor (name, dtype, shape,
    raw bytes), in sorted order, so neither the dict order nor the file layout matters."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted((k, v) for k, v in meta.items() if k != CHECKSUM_KEY)).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return f"sha256:{h.hexdigest()}"


def save_checkpoint(path: str | Path, agent_name: str, config: dict, tensors: dict[str, torch.Tensor],
                    extra: dict | None = None) -> Path:
    """Write atomically (temporary file, then rename): an interrupted save never leaves a half file. The metadata
    gets the checksum ``load_checkpoint`` verifies."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": FORMAT, "agent": agent_name, "config": json.dumps(config), "extra": json.dumps(extra or {})}
    meta[CHECKSUM_KEY] = checkpoint_checksum(meta, tensors)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def checkpoint_agent(path: str | Path) -> str | None:
    """The agent name a checkpoint was saved for, read from its metadata alone (no tensors); None for a file that
    is missing, unreadable or not a trafficgym checkpoint (``load_checkpoint`` says which)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    return meta.get("agent") if meta.get("format") == FORMAT else None


def load_checkpoint(path: str | Path, expected_agent: str | None = None) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Read ``(config, tensors, extra)``; ``CheckpointError`` if the file is missing, not a trafficgym
    checkpoint, or was made for another agent than ``expected_agent``; ``CheckpointChecksumError`` if its content
    does not match the checksum saved with it (files without a checksum, saved before there was one, load
    unverified)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist (expected a .safetensors file).")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({e}).") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a trafficgym checkpoint (format "
                              f"{meta.get('format')!r}, expected {FORMAT!r}).")
    if CHECKSUM_KEY in meta:
        actual = checkpoint_checksum(meta, tensors)
        if actual != meta[CHECKSUM_KEY]:
            raise CheckpointChecksumError(
                f"Checkpoint {path} is damaged: its content does not match the checksum saved with it "
                f"({actual[:19]}... vs {meta[CHECKSUM_KEY][:19]}...). Copy or download it again, or re-save it "
                "from its source.")
    if expected_agent is not None and meta.get("agent") != expected_agent:
        extra = json.loads(meta.get("extra", "{}"))
        if extra.get("weights_of") == expected_agent:  # a training state (policy + value head + optimizer)
            raise CheckpointError(f"{path} is the training state of a {meta.get('agent')!r} run (for --resume), "
                                  f"not {expected_agent!r} weights; load {Path(path).with_name('model.safetensors')}.")
        raise CheckpointError(f"{path} holds a {meta.get('agent')!r} checkpoint, not {expected_agent!r}; load it "
                              f"with --agent {meta.get('agent')}.")
    return json.loads(meta["config"]), tensors, json.loads(meta.get("extra", "{}"))


def load_state_dict_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """``module.load_state_dict`` with the mismatch (missing, unexpected, wrong shapes) named in a CheckpointError.
    A module with an ``upgrade_state_dict(tensors) -> tensors`` method first renames the tensors of checkpoints
    written by older versions of it."""
    upgrade = getattr(module, "upgrade_state_dict", None)
    if callable(upgrade):
        tensors = upgrade(tensors)
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"Checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, shape mismatches {shapes[:5]}. Was it saved with another size "
                              f"or configuration?")
    module.load_state_dict(tensors)
