"""Windows of a recorded run -> INTERACTION prediction-challenge cases, and the compact packed form.

A *case* is a 91-frame window (9.1 s at 10 Hz) of one run. It holds every vehicle present in any of its
frames (tracks may start or end inside the window) and at least one vehicle present in all of them.
CSV layout (what trajdata's ``InteractionDataset`` reads)::

    case_id,track_id,frame_id,timestamp_ms,agent_type,x,y,vx,vy,psi_rad,length,width

``case_id`` (1..C, contiguous) and ``frame_id`` (1..91) start at 1, ``track_id`` is 1..n per case in
order of first appearance, rows are sorted by case, track, frame (so the last line holds the largest
case id), ``timestamp_ms = frame_id * 100``, every value has exactly three decimals.

The committed assets store each run once (not once per overlapping window): the integer track table of
:class:`~envs.data.towns.simulate.RunTracks` plus the window start frames, delta-coded and xz-compressed.
The CSV text is a pure function of that table, so materialising it reproduces the generator's bytes.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from envs.data.towns.simulate import RunTracks

CASE_LENGTH = 91
"""Frames per case (9.1 s at 10 Hz)."""

CSV_HEADER = "case_id,track_id,frame_id,timestamp_ms,agent_type,x,y,vx,vy,psi_rad,length,width\n"

_PACK_MAGIC = b"TRAFFICGYM-TOWNS-TRACKS\n"
PACK_VERSION = 1


class PackFormatError(ValueError):
    """A packed track file that does not decode (wrapped into ``CorruptDataError`` by the caller)."""


@dataclass(frozen=True)
class SplitRun:
    """One town's recorded run for one split and the start frames of its cases (ascending)."""

    tracks: RunTracks
    window_starts: tuple[int, ...]


def full_window_starts(tracks: RunTracks, stride: int, max_cases: int) -> list[int]:
    """Start frames ``0, stride, 2*stride, ...`` of windows that fit in the run and contain a vehicle
    present in all :data:`CASE_LENGTH` frames; at most ``max_cases`` of them."""
    last = tracks.first_frame + tracks.num_track_frames  # exclusive end frame of each track
    starts = []
    for s in range(0, tracks.num_frames - CASE_LENGTH + 1, stride):
        if np.any((tracks.first_frame <= s) & (last >= s + CASE_LENGTH)):
            starts.append(s)
            if len(starts) == max_cases:
                break
    return starts


def tracks_in_window(tracks: RunTracks, start: int) -> np.ndarray:
    """Indices (ascending, i.e. in order of first appearance) of tracks present in ``[start, start+91)``."""
    last = tracks.first_frame + tracks.num_track_frames
    return np.flatnonzero((tracks.first_frame < start + CASE_LENGTH) & (last > start))


def agents_per_case(run: SplitRun) -> list[int]:
    """Number of tracks in each case of ``run``."""
    return [len(tracks_in_window(run.tracks, s)) for s in run.window_starts]


def _row_texts(tracks: RunTracks) -> list[str]:
    """``"x,y,vx,vy,psi_rad,length,width"`` for every row of ``tracks`` (three decimals, SI units)."""
    rows = tracks.num_track_frames
    length = np.repeat(tracks.length_mm, rows)
    width = np.repeat(tracks.width_mm, rows)
    table = np.concatenate([tracks.values, length[:, None], width[:, None]], axis=1) / 1000.0
    # Values are integers / 1000, so "%.3f" prints the exact fixed-point decimal on every platform.
    fmt = "%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f"
    return [fmt % tuple(r) for r in table.tolist()]


def iter_csv_chunks(run: SplitRun) -> Iterator[str]:
    """The CSV file of ``run`` as text chunks (header, then one chunk per case)."""
    yield CSV_HEADER
    texts = _row_texts(run.tracks)
    offsets = run.tracks.offsets
    first = run.tracks.first_frame
    for case_id, start in enumerate(run.window_starts, start=1):
        lines = []
        for track_id, t in enumerate(tracks_in_window(run.tracks, start), start=1):
            lo = max(int(first[t]), start)
            hi = min(int(first[t] + run.tracks.num_track_frames[t]), start + CASE_LENGTH)
            base = int(offsets[t]) - int(first[t])
            for f in range(lo, hi):
                frame_id = f - start + 1
                lines.append(f"{case_id},{track_id},{frame_id},{frame_id * 100},car,{texts[base + f]}\n")
        yield "".join(lines)


def csv_sha256(run: SplitRun) -> tuple[str, int]:
    """sha256 hex digest and byte size of the CSV text of ``run`` (without writing it)."""
    h = hashlib.sha256()
    size = 0
    for chunk in iter_csv_chunks(run):
        data = chunk.encode("ascii")
        h.update(data)
        size += len(data)
    return h.hexdigest(), size


def write_csv(run: SplitRun, path) -> None:
    """Write the CSV of ``run`` to ``path`` (ASCII, ``\\n`` line ends)."""
    with open(path, "w", encoding="ascii", newline="\n") as fh:
        for chunk in iter_csv_chunks(run):
            fh.write(chunk)


def pack_run(run: SplitRun) -> bytes:
    """Serialise ``run`` to the committed-asset form: magic, JSON header line, little-endian int32 columns.

    The five per-row value columns are stored as first differences over the concatenated rows
    (smooth trajectories -> small numbers -> xz compresses them ~2.5 bytes per row), then the whole
    payload is xz-compressed. No pickle: the format is plain bytes and JSON.
    """
    t = run.tracks
    header = {
        "version": PACK_VERSION,
        "num_frames": t.num_frames,
        "num_tracks": t.num_tracks,
        "num_rows": int(t.values.shape[0]),
        "window_starts": list(run.window_starts),
        "columns": ["first_frame", "num_track_frames", "length_mm", "width_mm",
                    "d_x_mm", "d_y_mm", "d_vx_mmps", "d_vy_mmps", "d_psi_mrad"],
    }
    parts = [_PACK_MAGIC, json.dumps(header, sort_keys=True).encode("ascii") + b"\n"]
    for col in (t.first_frame, t.num_track_frames, t.length_mm, t.width_mm):
        parts.append(_int32(col).tobytes())
    deltas = np.diff(t.values, axis=0, prepend=np.zeros((1, 5), dtype=np.int64))
    for k in range(5):
        parts.append(_int32(deltas[:, k]).tobytes())
    return lzma.compress(b"".join(parts), format=lzma.FORMAT_XZ, preset=6)


def unpack_run(blob: bytes) -> SplitRun:
    """Inverse of :func:`pack_run`; raises :class:`PackFormatError` on any inconsistency."""
    try:
        raw = lzma.decompress(blob, format=lzma.FORMAT_XZ)
    except lzma.LZMAError as exc:
        raise PackFormatError(f"not a valid xz stream ({exc})") from exc
    if not raw.startswith(_PACK_MAGIC):
        raise PackFormatError("missing track-pack magic header")
    nl = raw.index(b"\n", len(_PACK_MAGIC))
    try:
        header = json.loads(raw[len(_PACK_MAGIC):nl])
        if header["version"] != PACK_VERSION:
            raise PackFormatError(f"pack version {header['version']}, expected {PACK_VERSION}")
        n, r = int(header["num_tracks"]), int(header["num_rows"])
        body = np.frombuffer(raw, dtype="<i4", offset=nl + 1)
    except (ValueError, KeyError, TypeError) as exc:
        raise PackFormatError(f"bad pack header ({exc})") from exc
    if body.shape[0] != 4 * n + 5 * r:
        raise PackFormatError(f"pack body has {body.shape[0]} int32 values, expected {4 * n + 5 * r}")
    cols = [body[i * n:(i + 1) * n].astype(np.int64) for i in range(4)]
    deltas = body[4 * n:].reshape(5, r).astype(np.int64)
    values = np.cumsum(deltas, axis=1).T.copy()
    tracks = RunTracks(
        num_frames=int(header["num_frames"]), first_frame=cols[0], num_track_frames=cols[1],
        length_mm=cols[2], width_mm=cols[3], values=values,
    )
    if int(tracks.num_track_frames.sum()) != r:
        raise PackFormatError("track lengths do not add up to the row count")
    return SplitRun(tracks=tracks, window_starts=tuple(int(s) for s in header["window_starts"]))


def _int32(a: np.ndarray) -> np.ndarray:
    if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
        raise OverflowError("value out of int32 range in track pack")
    return np.ascontiguousarray(a, dtype="<i4")
