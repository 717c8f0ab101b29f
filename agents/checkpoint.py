"""Checkpoints: one ``.safetensors`` file holding the tensors and, in its metadata, the JSON needed to rebuild
the agent (its registered name and constructor config). Loading never executes code (no pickle)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from envs.errors import CheckpointError

FORMAT = "trafficgym-checkpoint-v1"


def save_checkpoint(path: str | Path, agent_name: str, config: dict, tensors: dict[str, torch.Tensor],
                    extra: dict | None = None) -> Path:
    """Write atomically (temporary file, then rename): an interrupted save never leaves a half file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "agent": agent_name, "config": json.dumps(config), "extra": json.dumps(extra or {})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path, expected_agent: str | None = None) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Read ``(config, tensors, extra)``; ``CheckpointError`` if the file is missing, not a trafficgym
    checkpoint, or was made for another agent than ``expected_agent``."""
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
    if expected_agent is not None and meta.get("agent") != expected_agent:
        raise CheckpointError(f"{path} holds a {meta.get('agent')!r} checkpoint, not {expected_agent!r}; load it "
                              f"with --agent {meta.get('agent')}.")
    return json.loads(meta["config"]), tensors, json.loads(meta.get("extra", "{}"))


def load_state_dict_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """``module.load_state_dict`` with the mismatch (missing, unexpected, wrong shapes) named in a CheckpointError."""
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
