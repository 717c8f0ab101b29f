"""On-disk scene cache: each scene and map converted once from trajdata, then served in about a millisecond.

Layout under ``<cache_dir>/<dataset>-<hash of data dir>[-dt<dt>]/``::

    index.json              version, source fingerprint, per-split scene list with counts, maps
    maps/<map>.npz          one ``MapData`` per map
    scenes/<split>/<id>.npz one ``Scene`` per scene (uncompressed npz: plain arrays, no pickle)
    trajdata/               trajdata's own cache, an intermediate used only while building

Every write is atomic (temporary file, then rename) and builds are serialised with a file lock, so parallel
processes (test workers, torchrun ranks) share one cache. A cache entry that fails to load (truncated,
bad CRC, wrong schema) is rebuilt from the source with a warning — never silently used. A changed source
(files added, resized or touched) invalidates the whole cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from envs.errors import CorruptDataError, DatasetNotFoundError, UnknownNameError
from envs.fileio import atomic_write
from envs.types import AgentType, MapData, PolylineType, Scene

CACHE_VERSION = 1
TOWNS = "towns"
_SCENE_KEYS = ("version", "scene_id", "dataset", "split", "map_id", "dt", "agent_ids", "agent_type", "extent",
               "trajectory", "valid", "ego_index", "tl_lane", "tl_state")
_MAP_KEYS = ("version", "map_id", "points", "offsets", "polyline_type", "source_id", "successors",
             "left_neighbors", "right_neighbors", "max_spacing")


def trafficgym_home() -> Path:
    """Where trafficgym keeps data and caches: ``$TRAFFICGYM_HOME``, default ``~/.cache/trafficgym``."""
    return Path(os.environ.get("TRAFFICGYM_HOME", "~/.cache/trafficgym")).expanduser()


def known_datasets() -> tuple[str, ...]:
    from envs.data.trajdata_source import TRAJDATA_DATASETS

    return (TOWNS, *TRAJDATA_DATASETS)


# ----------------------------------------------------------------------------------------------------------
# npz (de)serialisation
# ----------------------------------------------------------------------------------------------------------

def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read every array (which checks each member's CRC) and the schema; CorruptDataError if anything is off."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise CorruptDataError(f"Cache file {path} is unreadable ({type(e).__name__}: {e}).") from e
    missing = [k for k in keys if k not in data]
    if missing:
        raise CorruptDataError(f"Cache file {path} lacks {missing}; it was written by another version.")
    if int(data["version"]) != CACHE_VERSION:
        raise CorruptDataError(f"Cache file {path} has version {int(data['version'])}, expected {CACHE_VERSION}.")
    return data


def save_scene(path: Path, scene: Scene) -> None:
    _atomic_savez(path, {
        "version": np.array(CACHE_VERSION), "scene_id": np.array(scene.scene_id), "dataset": np.array(scene.dataset),
        "split": np.array(scene.split), "map_id": np.array(scene.map_id), "dt": np.array(scene.dt),
        "agent_ids": scene.agent_ids.astype(str), "agent_type": scene.agent_type, "extent": scene.extent,
        "trajectory": scene.trajectory, "valid": scene.valid, "ego_index": np.array(scene.ego_index),
        "tl_lane": scene.tl_lane, "tl_state": scene.tl_state,
    })


def load_scene(path: Path, map_data: MapData | None = None) -> Scene:
    """Load one cached scene; ``CorruptDataError`` if the file is damaged or fails validation."""
    d = _load_npz(path, _SCENE_KEYS)
    try:
        scene = Scene(
            scene_id=str(d["scene_id"]), dataset=str(d["dataset"]), split=str(d["split"]), map_id=str(d["map_id"]),
            dt=float(d["dt"]), agent_ids=d["agent_ids"], agent_type=d["agent_type"], extent=d["extent"],
            trajectory=d["trajectory"], valid=d["valid"], ego_index=int(d["ego_index"]), tl_lane=d["tl_lane"],
            tl_state=d["tl_state"], map=map_data,
        )
        scene.validate()
    except (ValueError, TypeError) as e:
        raise CorruptDataError(f"Cache file {path} holds an invalid scene: {e}") from e
    return scene


def save_map(path: Path, m: MapData) -> None:
    _atomic_savez(path, {
        "version": np.array(CACHE_VERSION), "map_id": np.array(m.map_id), "points": m.points, "offsets": m.offsets,
        "polyline_type": m.polyline_type, "source_id": m.source_id.astype(str), "successors": m.successors,
        "left_neighbors": m.left_neighbors, "right_neighbors": m.right_neighbors,
        "max_spacing": np.array(m.max_spacing),
    })


def load_map(path: Path) -> MapData:
    d = _load_npz(path, _MAP_KEYS)
    m = MapData(map_id=str(d["map_id"]), points=d["points"], offsets=d["offsets"], polyline_type=d["polyline_type"],
                source_id=d["source_id"], successors=d["successors"], left_neighbors=d["left_neighbors"],
                right_neighbors=d["right_neighbors"], max_spacing=float(d["max_spacing"]))
    if m.offsets.shape != (m.num_polylines + 1,) or m.offsets[-1] != len(m.points):
        raise CorruptDataError(f"Cache file {path} holds an inconsistent map (offsets do not match points).")
    return m


# ----------------------------------------------------------------------------------------------------------
# The dataset object
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SceneEntry:
    """One scene as the dataset's index describes it (``SceneDataset.entry``)."""

    id: str
    map_id: str
    num_agents: int
    num_steps: int
    ego_index: int  # -1: no ego candidate (no vehicle observed throughout)


class SceneDataset(Sequence):
    """The scenes of one dataset split, served from the cache. ``ds[i]`` or ``ds["scene id"]`` -> ``Scene``
    with its ``map`` attached; maps are loaded once and shared."""

    def __init__(self, cache: _Cache, split: str):
        self._cache, self.split = cache, split
        self._entries: list[dict] = cache.index["splits"][split]["scenes"]
        self._by_id = {e["id"]: i for i, e in enumerate(self._entries)}
        self._maps: dict[str, MapData] = {}
        self._indices: dict = {}
        self.dataset = cache.dataset
        self.dt = float(cache.index["dt"])

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def scene_ids(self) -> list[str]:
        return [e["id"] for e in self._entries]

    def entry(self, key: int | str) -> SceneEntry:
        """What the index knows of a scene (by position or id), without loading it."""
        e = self._entries[self.index_of(key) if isinstance(key, str) else key]
        return SceneEntry(id=e["id"], map_id=e["map_id"], num_agents=int(e["num_agents"]),
                          num_steps=int(e["num_steps"]), ego_index=int(e["ego_index"]))

    def index_of(self, scene_id: str) -> int:
        if scene_id not in self._by_id:
            raise UnknownNameError(f"scene id in {self.dataset}/{self.split}", scene_id, self._by_id,
                                   fix="All ids: env.unwrapped.scene_ids or the dataset's scene_ids. To pick by "
                                       "position, use an integer (dataset[i], or the reset option scene_index).")
        return self._by_id[scene_id]

    def __getitem__(self, key):
        if isinstance(key, str):
            key = self.index_of(key)
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(len(self)))]
        if not -len(self) <= key < len(self):
            raise IndexError(f"Scene index {key} out of range for {len(self)} scenes in {self.dataset}/{self.split}.")
        entry = self._entries[key]
        path = self._cache.root / entry["file"]
        try:
            return load_scene(path, self.map(entry["map_id"]))
        except CorruptDataError as e:
            warnings.warn(f"{e} Rebuilding it from the source.", stacklevel=2)
            self._cache.rebuild_scenes(self.split, {entry["id"]})
            return load_scene(path, self.map(entry["map_id"]))

    def __iter__(self) -> Iterator[Scene]:
        for i in range(len(self)):
            yield self[i]

    def map(self, map_id: str) -> MapData:
        if map_id not in self._maps:
            path = self._cache.root / self._cache.index["maps"][map_id]["file"]
            try:
                self._maps[map_id] = load_map(path)
            except CorruptDataError as e:
                warnings.warn(f"{e} Rebuilding the cache from the source.", stacklevel=2)
                self._cache.rebuild_map(self.split, map_id)
                self._maps[map_id] = load_map(path)
        return self._maps[map_id]

    def map_index(self, map_id: str):
        """The map's precomputed query structures (``envs.map_index.MapIndex``), built once and kept on disk
        beside the map (the signed-distance field takes about a second per town to compute)."""
        from envs.map_index import build_map_index, load_map_index, save_map_index

        if map_id not in self._indices:
            path = self._cache.root / "maps" / f"{_safe(map_id)}.index.npz"
            try:
                self._indices[map_id] = load_map_index(path)
            except CorruptDataError as e:
                if path.exists():
                    warnings.warn(f"{e} Rebuilding it.", stacklevel=2)
                self._indices[map_id] = build_map_index(self.map(map_id))
                save_map_index(path, self._indices[map_id])
        return self._indices[map_id]

    def info(self) -> dict:
        """Statistics of this split, computed from the index (no scene is loaded)."""
        entries = self._entries
        per_type = np.array([e["agents_per_type"] for e in entries], np.int64).reshape(-1, len(AgentType))
        counts = np.array([e["num_agents"] for e in entries], np.int64)
        steps = sorted({e["num_steps"] for e in entries})
        maps = {mid: self._cache.index["maps"][mid]["counts"] for mid in sorted({e["map_id"] for e in entries})}
        return {
            "dataset": self.dataset, "split": self.split, "data_dir": self._cache.index["data_dir"],
            "scenes": len(entries), "dt": self.dt,
            "scene_length_steps": steps[0] if len(steps) == 1 else steps,
            "scene_length_s": (round(steps[0] * self.dt, 3) if len(steps) == 1
                               else [round(s * self.dt, 3) for s in steps]),
            "agents": int(counts.sum()),
            "agents_per_type": {t.name.lower(): int(per_type[:, t].sum()) for t in AgentType},
            "mean_agents_per_scene": round(float(counts.mean()), 2) if len(counts) else 0.0,
            "min_agents_per_scene": int(counts.min()) if len(counts) else 0,
            "max_agents_per_scene": int(counts.max()) if len(counts) else 0,
            "scenes_without_ego": int(sum(e["ego_index"] < 0 for e in entries)),
            "maps": maps,
        }


def open_dataset(dataset: str = TOWNS, split: str = "train", data_dir: str | Path | None = None,
                 cache_dir: str | Path | None = None, dt: float | None = None, rebuild: bool = False,
                 case_length: int | None = None) -> SceneDataset:
    """Open one split of a dataset through the scene cache, building the cache on first use.

    Args:
        dataset: ``"towns"`` (the bundled default, no data dir needed) or any trajdata dataset name.
        split: e.g. ``"train"``, ``"val"``, ``"test"`` (the dataset's own split names).
        data_dir: the dataset's files (required except for ``towns``).
        cache_dir: cache root; default ``$TRAFFICGYM_HOME/cache``.
        dt: resample to this step (s); default the dataset's own.
        rebuild: discard and rebuild this dataset's cache.
        case_length: frames per case for INTERACTION-layout data (default: ``towns.json`` if present, else 40).
    """
    cache = _Cache.open(dataset, data_dir, cache_dir, dt, case_length)
    with cache.locked():
        if rebuild:
            cache.reset()
        cache.ensure_split(split)
    return SceneDataset(cache, split)


class _Cache:
    """One dataset's cache directory and its index (see the module docstring)."""

    def __init__(self, dataset: str, source_name: str, data_dir: Path, root: Path, dt: float | None,
                 case_length: int | None):
        self.dataset, self.source_name, self.data_dir, self.root = dataset, source_name, data_dir, root
        self.dt, self.case_length = dt, case_length
        self.index: dict = {}

    @classmethod
    def open(cls, dataset: str, data_dir, cache_dir, dt, case_length) -> _Cache:
        from envs.data.trajdata_source import TRAJDATA_DATASETS

        if dataset == TOWNS:
            from envs.data.towns import ensure_towns

            data_dir = ensure_towns(None if data_dir is None else Path(data_dir))
            source_name = "interaction_multi"
        elif dataset in TRAJDATA_DATASETS:
            if data_dir is None:
                raise DatasetNotFoundError(f"Dataset {dataset!r} needs data_dir= (--data-dir): the folder holding its "
                                           f"files. Only {TOWNS!r} ships with trafficgym.")
            source_name = dataset
        else:
            raise UnknownNameError("dataset", dataset, known_datasets(),
                                   fix=f"{TOWNS!r} ships with trafficgym; the others are trajdata datasets "
                                       f"read from --data-dir.")
        data_dir = Path(data_dir).expanduser().resolve()
        if not data_dir.is_dir():
            raise DatasetNotFoundError(f"Data directory {data_dir} for dataset {dataset!r} does not exist. "
                                       f"Point --data-dir at the dataset's files.")
        if source_name.startswith("interaction") and case_length is None:
            manifest = data_dir / "towns.json"
            if manifest.exists():
                case_length = int(json.loads(manifest.read_text())["case_length"])
        key = hashlib.sha1(str(data_dir).encode()).hexdigest()[:10]
        name = f"{dataset}-{key}" + (f"-dt{dt:g}" if dt else "")
        root = Path(cache_dir).expanduser() if cache_dir else trafficgym_home() / "cache"
        return cls(dataset, source_name, data_dir, root / name, dt, case_length)

    # ---- bookkeeping -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self):
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.root.parent / f".{self.root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def fingerprint(self) -> str:
        """Changes whenever the source files change (names, sizes, mtimes) or the conversion settings do."""
        h = hashlib.sha1(f"{CACHE_VERSION}|{self.source_name}|{self.dt}|{self.case_length}".encode())
        if self.source_name.startswith("interaction"):
            for p in sorted([*self.data_dir.glob("**/*.csv"), *self.data_dir.glob("**/*.osm")]):
                st = p.stat()
                h.update(f"{p.relative_to(self.data_dir)}|{st.st_size}|{st.st_mtime_ns}".encode())
        else:
            h.update(str(self.data_dir.stat().st_mtime_ns).encode())
        return h.hexdigest()

    def _index_path(self) -> Path:
        return self.root / "index.json"

    def _fresh_index(self, fingerprint: str) -> dict:
        return {"version": CACHE_VERSION, "dataset": self.dataset, "source": self.source_name,
                "data_dir": str(self.data_dir), "fingerprint": fingerprint, "dt": self.dt, "splits": {}, "maps": {}}

    def reset(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.index = {}

    def _load_index(self) -> None:
        fingerprint = self.fingerprint()
        try:
            index = json.loads(self._index_path().read_text())
            ok = index.get("version") == CACHE_VERSION and index.get("fingerprint") == fingerprint
        except FileNotFoundError:
            index, ok = None, False
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.warn(f"Cache index {self._index_path()} is corrupt; rebuilding the cache.", stacklevel=3)
            index, ok = None, False
        if not ok:
            if index is not None:  # source changed or old version: stale entries must not survive
                shutil.rmtree(self.root, ignore_errors=True)
            index = self._fresh_index(fingerprint)
        self.index = index

    def _source(self):
        from envs.data.trajdata_source import TrajdataSource

        return TrajdataSource(self.source_name, self.data_dir, self.root / "trajdata", dt=self.dt,
                              case_length=self.case_length)

    # ---- building ----------------------------------------------------------------------------------------
    def ensure_split(self, split: str) -> None:
        self._load_index()
        if split in self.index["splits"]:
            return
        scenes, maps = self._source().load_split(split)
        if not scenes:
            raise DatasetNotFoundError(f"Split {split!r} of {self.dataset} at {self.data_dir} holds no scenes.")
        if self.index["dt"] is None:
            self.index["dt"] = scenes[0].dt
        for m in maps.values():
            self._write_map(m)
        self.index["splits"][split] = {"scenes": [self._write_scene(s) for s in scenes]}
        shutil.rmtree(self.root / "trajdata", ignore_errors=True)  # intermediate only; ours is the cache
        with atomic_write(self._index_path()) as tmp:
            tmp.write_text(json.dumps(self.index, indent=1))

    def _write_map(self, m: MapData) -> None:
        rel = f"maps/{_safe(m.map_id)}.npz"
        save_map(self.root / rel, m)
        self.index["maps"][m.map_id] = {"file": rel, "counts": {
            "lanes": m.count(PolylineType.LANE_CENTER), "lane_boundaries": m.count(PolylineType.LANE_BOUNDARY),
            "road_edges": m.count(PolylineType.ROAD_EDGE), "crosswalks": m.count(PolylineType.CROSSWALK),
            "lane_successor_edges": int(len(m.successors)), "points": int(len(m.points)),
            "extent_m": [round(float(v), 1) for v in m.extent]}}

    def _write_scene(self, s: Scene) -> dict:
        rel = f"scenes/{s.split}/{_safe(s.scene_id)}.npz"
        save_scene(self.root / rel, s)
        return {"id": s.scene_id, "file": rel, "map_id": s.map_id, "num_agents": s.num_agents,
                "num_steps": s.num_steps, "ego_index": s.ego_index,
                "agents_per_type": np.bincount(s.agent_type, minlength=len(AgentType)).tolist()}

    def rebuild_scenes(self, split: str, ids: set[str]) -> None:
        with self.locked():
            scenes, _ = self._source().load_split(split, names=ids)
            for s in scenes:
                self._write_scene(s)
            shutil.rmtree(self.root / "trajdata", ignore_errors=True)

    def rebuild_map(self, split: str, map_id: str) -> None:
        with self.locked():
            first = next(e["id"] for e in self.index["splits"][split]["scenes"] if e["map_id"] == map_id)
            _, maps = self._source().load_split(split, names={first})
            self._write_map(maps[map_id])
            shutil.rmtree(self.root / "trajdata", ignore_errors=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
