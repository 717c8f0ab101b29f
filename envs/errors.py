"""Typed errors. Every message names the bad value, what was expected, and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TrafficGymError(Exception):
    """Base class of every error trafficgym raises on purpose."""


class UnknownNameError(TrafficGymError, KeyError):
    """A name (dataset, env kwarg, agent, metric, ...) that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str], fix: str = ""):
        self.kind, self.name, self.known = kind, name, sorted(known)
        msg = f"Unknown {kind} {name!r}."
        hint = did_you_mean(name, self.known)
        if hint:
            msg += f" Did you mean {hint!r}?"
        msg += f" Known: {', '.join(self.known) if self.known else '(none)'}."
        if fix:
            msg += f" {fix}"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class DatasetNotFoundError(TrafficGymError, FileNotFoundError):
    """A data directory that is missing, empty, or lacks the files a loader needs."""


class CorruptDataError(TrafficGymError, ValueError):
    """A data, map or cache file that exists but cannot be parsed or fails validation."""


class SplitNotFoundError(TrafficGymError, ValueError):
    """A dataset split that the dataset does not have."""


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """The closest known name to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


class InvalidActionError(TrafficGymError, ValueError):
    """An action of the wrong shape or dtype, holding NaN/inf, or outside the action bounds."""


class EmptySceneError(TrafficGymError, ValueError):
    """A scene (or batch) without agents to simulate."""


class NoEgoError(TrafficGymError, ValueError):
    """A scene without an ego candidate, used where an ego is required."""


class ResetNeededError(TrafficGymError, RuntimeError):
    """``step`` called before ``reset`` or after the episode ended."""


def check_kwargs(kind: str, given: dict, known) -> None:
    """Raise ``UnknownNameError`` for the first key of ``given`` not in ``known`` (with a suggestion)."""
    for key in given:
        if key not in known:
            raise UnknownNameError(kind, key, known)


class CheckpointError(TrafficGymError, ValueError):
    """A checkpoint that is missing, not a trafficgym checkpoint, or made for another model or configuration."""


class VocabularyError(TrafficGymError, ValueError):
    """A motion vocabulary that cannot serve the request: missing agent type, malformed tensors, no data."""


class RenderError(TrafficGymError, ValueError):
    """Bad renderer input: a render config out of range, a map that is not the scene's, a batch index outside
    the state, per-agent arrays of the wrong shape."""


class VideoWriteError(TrafficGymError, OSError):
    """A video path that cannot be written (missing permissions, a directory, a parent that is a file)."""


class NoDisplayError(TrafficGymError, RuntimeError):
    """``render_mode="human"`` where no display exists (headless machine, ``SDL_VIDEODRIVER=dummy``)."""
