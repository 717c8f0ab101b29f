"""Typed errors. Every message names the bad value, what was expected, and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from gymnasium.error import ClosedEnvironmentError

MAX_LISTED = 30  # an unknown-name error lists every known name up to this many, else the NEAREST closest
NEAREST = 5


class TrafficGymError(Exception):
    """Base class of every error trafficgym raises on purpose."""


class UnknownNameError(TrafficGymError, KeyError):
    """A name (dataset, env kwarg, agent, metric, ...) that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str], fix: str = ""):
        given_order = list(known)
        self.kind, self.name, self.known = kind, name, sorted(given_order)
        msg = f"Unknown {kind} {name!r}."
        hint = did_you_mean(name, self.known)
        if hint:
            msg += f" Did you mean {hint!r}?"
        if len(self.known) <= MAX_LISTED:
            msg += f" Known: {', '.join(self.known) if self.known else '(none)'}."
        else:  # e.g. the 128 scene ids of a split: the closest few and the count, not a wall of names
            nearest = nearest_names(name, given_order)
            if nearest:
                msg += f" Nearest of the {len(self.known)} known: {', '.join(nearest)}."
            else:
                msg += f" {len(self.known)} known, e.g. {', '.join(given_order[:NEAREST])}."
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
    matches = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def nearest_names(name: str, known: Iterable[str], n: int = 0) -> list[str]:
    """Up to ``n`` (default ``NEAREST``) known names closest to ``name``, best first; [] when none is close."""
    return difflib.get_close_matches(str(name), list(known), n=n or NEAREST, cutoff=0.5)


class InvalidActionError(TrafficGymError, ValueError):
    """An action of the wrong shape or dtype, holding NaN/inf, or outside the action bounds."""


class EmptySceneError(TrafficGymError, ValueError):
    """A scene (or batch) without agents to simulate."""


class NoEgoError(TrafficGymError, ValueError):
    """A scene without an ego candidate, used where an ego is required."""


class ResetNeededError(TrafficGymError, RuntimeError):
    """``step`` called before ``reset`` or after the episode ended."""


class EnvClosedError(TrafficGymError, ClosedEnvironmentError, RuntimeError):
    """``step`` or ``reset`` called on an env after its ``close()`` (also Gymnasium's ``ClosedEnvironmentError``)."""


class InvalidOptionError(TrafficGymError, ValueError):
    """A reset option of the wrong type or value: a ``scene_index`` that is not an integer (floats and bools are
    refused, numpy integers accepted), a ``scene_id`` that is not a string, the wrong number of them."""


class SceneIndexError(InvalidOptionError, IndexError):
    """A ``scene_index`` outside the env's scenes."""


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


class CheckpointChecksumError(CheckpointError):
    """A checkpoint whose content (tensor bytes, metadata) differs from the checksum stored when it was saved: the
    file was damaged (a flipped bit, a bad copy) or edited after saving."""


class StaleStateError(TrafficGymError, RuntimeError):
    """``sim.step`` given a ``SimState`` that was already stepped: its trajectory buffer is shared with (and was
    advanced by) the state that step returned, so stepping it again would overwrite that state's present."""
