"""Locating and running the Eclipse SUMO binaries (the optional ``sumo`` extra).

SUMO is imported lazily: materialising the committed dataset (``ensure_towns``) never needs it, only
regenerating does. Every call goes through :func:`run_tool` so that a missing install or a failing
tool produces one typed error that names the fix.
"""

from __future__ import annotations

import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from envs.errors import TrafficGymError

INSTALL_HINT = "Install the optional SUMO extra: pip install -e '.[sumo]' (eclipse-sumo and sumolib 1.28.0)."


class SumoNotAvailableError(TrafficGymError, ImportError):
    """Eclipse SUMO (the ``sumo`` Python package with its binaries) or ``sumolib`` is not installed."""


class TownGenerationError(TrafficGymError, RuntimeError):
    """A SUMO tool failed, or generated data failed a sanity check while building the towns dataset."""


def sumo_home() -> Path:
    """The SUMO installation directory of the ``eclipse-sumo`` wheel (holds ``bin/`` and ``tools/``)."""
    try:
        import sumo  # optional dependency (the `sumo` extra): imported where used
    except ImportError as exc:
        raise SumoNotAvailableError(f"Eclipse SUMO is not importable ({exc}). {INSTALL_HINT}") from exc
    home = Path(sumo.SUMO_HOME)
    if not (home / "bin").is_dir():
        raise SumoNotAvailableError(f"SUMO_HOME {home} has no bin/ directory. {INSTALL_HINT}")
    return home


def require_sumolib():
    """Import and return ``sumolib``, or raise :class:`SumoNotAvailableError` naming the extra."""
    try:
        import sumolib  # optional dependency (the `sumo` extra): imported where used
    except ImportError as exc:
        raise SumoNotAvailableError(f"sumolib is not importable ({exc}). {INSTALL_HINT}") from exc
    return sumolib


def sumo_version() -> str:
    """The installed ``eclipse-sumo`` distribution version, e.g. ``"1.28.0"``."""
    sumo_home()  # raises the typed error when SUMO is missing
    try:
        return version("eclipse-sumo")
    except PackageNotFoundError:  # a SUMO install that did not come from the wheel
        return "unknown"


def tool_path(name: str) -> Path:
    """Absolute path of a SUMO binary (``sumo``, ``netgenerate``, ``netconvert``...)."""
    path = sumo_home() / "bin" / name
    if not path.exists():
        raise SumoNotAvailableError(f"SUMO binary {name!r} not found at {path}. {INSTALL_HINT}")
    return path


def run_tool(name: str, args: list[str], cwd: Path) -> None:
    """Run SUMO binary ``name`` with ``args`` in ``cwd``; raise :class:`TownGenerationError` on failure.

    Output is captured and only shown when the tool fails, so a generation run stays quiet.
    """
    env = dict(os.environ, SUMO_HOME=str(sumo_home()))
    cmd = [str(tool_path(name)), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise TownGenerationError(f"{name} failed with exit code {proc.returncode}: {' '.join(cmd)}\n{tail}")
