"""The only module that imports trajdata: turns any trajdata dataset into our ``Scene`` / ``MapData``.

trajdata 1.4.0 is the loader (and the reason users can bring nuScenes, nuPlan, Waymo, Lyft, INTERACTION...),
but it is not the simulator: we read each scene once, convert it to plain arrays, and the scene cache
(``scene_cache.py``) serves them from then on. trajdata is therefore only imported while a cache is built.

Known trajdata 1.4.0 problems and where they are handled (each has a test in ``tests/test_trajdata_source.py``):

1. numpy 2 removed ``np.string_`` (used by trajdata's data index): aliased to ``np.bytes_`` before import.
2. The INTERACTION loader hard-codes 40-frame cases (``INTERACTION_TRAIN_LENGTH``; longer cases hit an
   IndexError) and 10-frame ``test`` cases: ``_interaction_patches`` sets both to the dataset's case length
   while trajdata reads the data (the test length only when there are no real ``*_obs`` test files).
3. With zarr 3, re-caching over an existing map cache raises ``ContainsArrayError``: every build starts from an
   empty trajdata work directory (the trajdata cache is only an intermediate for us).
4. With vector maps on, the INTERACTION loader preloads all 18 real INTERACTION map names and fails on the
   first one missing: the location list is patched to the ``.osm`` files actually present.
5. trajdata's lane KD-tree indexes raw polyline points, so sparse lanes break nearest-lane queries: every
   polyline we emit is densified to ``MAX_POINT_SPACING`` (we never use trajdata's spatial queries).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.polygon import orient

from envs.errors import CorruptDataError, DatasetNotFoundError, SplitNotFoundError, UnknownNameError, did_you_mean
from envs.geometry import densify_polyline, wrap_angle
from envs.types import AgentType, MapData, PolylineType, Scene, TrafficLightState

# Dataset names trajdata 1.4.0 accepts (its README), grouped by the loader that reads them.
TRAJDATA_DATASETS: tuple[str, ...] = (
    "interaction_multi", "interaction_single",
    "nusc_trainval", "nusc_test", "nusc_mini",
    "nuplan_train", "nuplan_val", "nuplan_test", "nuplan_mini",
    "waymo_train", "waymo_val", "waymo_test",
    "lyft_sample", "lyft_train", "lyft_train_full", "lyft_val",
    "eupeds_eth", "eupeds_hotel", "eupeds_univ", "eupeds_zara1", "eupeds_zara2",
    "sdd",
)
INTERACTION_COLUMNS: tuple[str, ...] = (
    "case_id", "track_id", "frame_id", "timestamp_ms", "agent_type", "x", "y", "vx", "vy", "psi_rad", "length",
    "width",
)
INTERACTION_CASE_LENGTH = 40  # trajdata's default for real INTERACTION train/val cases
MAX_POINT_SPACING = 2.0  # m, between consecutive map points (workaround 5)
RASTER_PX_PER_M = 0.5  # trajdata always rasterises maps while caching; we never use the raster, keep it cheap
_SLIVER_M = 0.05  # lane polygons are grown/shrunk by this to close numerical gaps before the union
_MIN_HOLE_M2 = 2.0  # holes in the drivable area smaller than this are numerical slivers, not road edges

_TYPE_FROM_TRAJDATA = {0: AgentType.OTHER, 1: AgentType.VEHICLE, 2: AgentType.PEDESTRIAN, 3: AgentType.CYCLIST,
                       4: AgentType.VEHICLE}  # trajdata: UNKNOWN, VEHICLE, PEDESTRIAN, BICYCLE, MOTORCYCLE


def _import_trajdata():
    """Import trajdata with the numpy-2 workaround (1) applied first."""
    if not hasattr(np, "string_"):
        np.string_ = np.bytes_  # removed in numpy 2; trajdata's data index still uses it
    import trajdata  # noqa: F401
    from trajdata import UnifiedDataset
    from trajdata.caching.df_cache import DataFrameCache

    return UnifiedDataset, DataFrameCache


def check_dataset_name(dataset: str) -> None:
    """Raise ``UnknownNameError`` (with a suggestion) unless trajdata knows ``dataset``."""
    if dataset not in TRAJDATA_DATASETS:
        raise UnknownNameError("trajdata dataset", dataset, TRAJDATA_DATASETS,
                               fix="Pass one of these with --data-dir pointing at its files.")


def natural_key(name: str) -> tuple:
    """Sort key that orders ``..._2`` before ``..._10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


# ----------------------------------------------------------------------------------------------------------
# INTERACTION-layout checks (clear errors instead of trajdata's bare raises / IndexErrors)
# ----------------------------------------------------------------------------------------------------------

def interaction_files(data_dir: Path) -> tuple[list[Path], list[Path]]:
    """The track CSVs and Lanelet2 maps of an INTERACTION-layout directory, checked for presence."""
    if not data_dir.is_dir():
        raise DatasetNotFoundError(
            f"Data directory {data_dir} does not exist. Point --data-dir at the folder holding the INTERACTION "
            f"dataset (track CSVs under <split>/ and Lanelet2 .osm maps).")
    csvs = sorted(data_dir.glob("**/*.csv"))
    maps = sorted(data_dir.glob("**/*.osm"))
    if not csvs:
        raise DatasetNotFoundError(
            f"No track CSV (*.csv) under {data_dir}. Expected the INTERACTION prediction-challenge layout: "
            f"<root>/<split>/DR_<CTY>_<A>_<B>_<split>.csv plus <root>/**/DR_<CTY>_<A>_<B>.osm.")
    if not maps:
        raise DatasetNotFoundError(f"No Lanelet2 map (*.osm) under {data_dir}; every location needs "
                                   f"DR_<CTY>_<A>_<B>.osm somewhere below the data directory.")
    return csvs, maps


def interaction_splits(csvs: list[Path]) -> tuple[str, ...]:
    """Splits present in a list of INTERACTION track CSVs (the token before the extension)."""
    return tuple(sorted({p.stem.rsplit("_", 1)[-1] for p in csvs}))


def check_interaction_csv(path: Path) -> None:
    """Raise ``CorruptDataError`` naming ``path`` if its header or its last line is not a valid track row."""
    try:
        with open(path, "rb") as f:
            header = f.readline().decode().strip().split(",")
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read().decode(errors="replace")
    except OSError as e:
        raise CorruptDataError(f"Cannot read track file {path}: {e}.") from e
    if set(header) != set(INTERACTION_COLUMNS):
        raise CorruptDataError(
            f"Track file {path} has header {header}; expected the INTERACTION columns {list(INTERACTION_COLUMNS)}. "
            f"Re-export or re-download the file.")
    last = tail.rstrip("\n").rsplit("\n", 1)[-1].split(",")
    ok = len(last) == len(INTERACTION_COLUMNS) and tail.endswith("\n")
    if ok:
        try:
            int(float(last[header.index("case_id")]))
            [float(last[header.index(c)]) for c in ("x", "y", "vx", "vy", "psi_rad", "length", "width")]
        except ValueError:
            ok = False
    if not ok:
        raise CorruptDataError(
            f"Track file {path} is truncated or corrupt: its last line {','.join(last)!r} is not a complete "
            f"track row. Restore the file (for the towns dataset: delete it and rerun, or `make data`).")


def check_osm(path: Path) -> None:
    """Raise ``CorruptDataError`` naming ``path`` if it is not well-formed OSM XML."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise CorruptDataError(f"Map file {path} is not valid XML ({e}); it is truncated or corrupt. "
                               f"Restore it from the dataset.") from e
    if root.tag != "osm":
        raise CorruptDataError(f"Map file {path} has root element <{root.tag}>, expected <osm> (Lanelet2 map).")


@contextlib.contextmanager
def _interaction_patches(case_length: int, locations: tuple[str, ...], full_length_test: bool):
    """Workarounds 2 and 4: set the loader's case length and map-location list while it reads our data.

    The stock loader also gives every ``test`` scene the 10-frame length of the real challenge's ``*_obs``
    test files; a dataset without such files (ours) has full-length test cases, so that length is raised too.
    """
    import trajdata.dataset_specific.interaction.interaction_dataset as idm

    names = ("INTERACTION_TRAIN_LENGTH", "INTERACTION_TEST_LENGTH", "INTERACTION_DETAILED_LOCATIONS")
    saved = {n: getattr(idm, n) for n in names}
    idm.INTERACTION_TRAIN_LENGTH, idm.INTERACTION_DETAILED_LOCATIONS = case_length, locations
    if full_length_test:
        idm.INTERACTION_TEST_LENGTH = case_length
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(idm, n, v)


@contextlib.contextmanager
def _quiet():
    """Silence trajdata's pandas deprecation chatter (hundreds of lines per build); our own errors still raise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*inplace.*")
        warnings.filterwarnings("ignore", module="trajdata")
        yield


# ----------------------------------------------------------------------------------------------------------
# The source
# ----------------------------------------------------------------------------------------------------------

class TrajdataSource:
    """Reads one trajdata dataset split by split and yields our ``Scene`` objects and ``MapData``.

    Args:
        dataset: a trajdata dataset name (``TRAJDATA_DATASETS``), e.g. ``"interaction_multi"``.
        data_dir: the dataset's files.
        work_dir: trajdata's cache folder for this source (emptied before each build; workaround 3).
        dt: desired step in seconds (trajdata resamples); ``None`` keeps the dataset's own.
        case_length: frames per INTERACTION case (default 40 as in the real dataset; the towns data uses more).
    """

    def __init__(self, dataset: str, data_dir: str | Path, work_dir: str | Path, dt: float | None = None,
                 case_length: int | None = None):
        check_dataset_name(dataset)
        self.dataset = dataset
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.work_dir = Path(work_dir)
        self.dt = dt
        self.case_length = case_length or INTERACTION_CASE_LENGTH
        self._is_interaction = dataset.startswith("interaction")
        self._locations: tuple[str, ...] = ()
        if self._is_interaction:
            csvs, maps = interaction_files(self.data_dir)
            self._csvs = csvs
            self._locations = tuple(sorted("_".join(p.stem.split("_")[1:]) for p in maps))
            self._maps = maps
        elif not self.data_dir.exists():
            raise DatasetNotFoundError(f"Data directory {self.data_dir} for trajdata dataset {dataset!r} does not "
                                       f"exist. Point --data-dir at the dataset's files.")

    # ---- splits ------------------------------------------------------------------------------------------
    def splits(self) -> tuple[str, ...]:
        """Splits this dataset offers (for INTERACTION layouts: those with track files present)."""
        if self._is_interaction:
            return interaction_splits(self._csvs)
        _, _ = _import_trajdata()
        from trajdata.utils.env_utils import get_raw_dataset

        parts = get_raw_dataset(self.dataset, str(self.data_dir)).metadata.parts
        return tuple(sorted({p for group in parts for p in group}))

    def check_split(self, split: str) -> None:
        splits = self.splits()
        if split not in splits:
            hint = did_you_mean(split, splits)
            raise SplitNotFoundError(f"Split {split!r} not found in {self.dataset} at {self.data_dir}."
                                     f"{f' Did you mean {hint!r}?' if hint else ''} "
                                     f"Available splits: {', '.join(splits) or '(none)'}.")
        if self._is_interaction:
            for p in self._csvs:
                if p.stem.endswith(f"_{split}"):
                    check_interaction_csv(p)
            for p in self._maps:
                check_osm(p)

    # ---- loading -----------------------------------------------------------------------------------------
    def _patches(self):
        if not self._is_interaction:
            return contextlib.nullcontext()
        has_obs_files = any(p.stem.endswith("obs") for p in self._csvs)
        return _interaction_patches(self.case_length, self._locations, full_length_test=not has_obs_files)

    def _unified_dataset(self, split: str):
        UnifiedDataset, _ = _import_trajdata()
        shutil.rmtree(self.work_dir, ignore_errors=True)  # workaround 3: never re-cache over a zarr-3 map cache
        self.work_dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            desired_data=[f"{self.dataset}-{split}"],
            data_dirs={self.dataset: str(self.data_dir)},
            cache_location=str(self.work_dir),
            centric="scene",
            desired_dt=self.dt,
            incl_vector_map=True,
            raster_map_params={"px_per_m": RASTER_PX_PER_M, "map_size_px": 64},
            vector_map_params={"incl_road_lanes": True, "incl_road_areas": True, "incl_ped_crosswalks": True,
                               "incl_ped_walkways": True, "collate": False, "keep_in_memory": True},
            num_workers=0,
            verbose=False,
        )
        with self._patches(), _quiet():
            try:
                return UnifiedDataset(**kwargs)
            except (IndexError, KeyError, ValueError, RuntimeError, TypeError) as e:
                hint = ""
                if self._is_interaction and isinstance(e, IndexError):
                    hint = (f" Cases longer than case_length={self.case_length} frames cause this: pass the "
                            f"dataset's case length.")
                raise CorruptDataError(f"trajdata could not read {self.dataset} split {split!r} from "
                                       f"{self.data_dir}: {type(e).__name__}: {e}.{hint}") from e

    def load_split(self, split: str, names: set[str] | None = None) -> tuple[list[Scene], dict[str, MapData]]:
        """Every scene of ``split`` (or only those named) in natural name order, and the maps they use."""
        self.check_split(split)
        ds = self._unified_dataset(split)
        _, DataFrameCache = _import_trajdata()
        scenes: list[Scene] = []
        maps: dict[str, MapData] = {}
        with self._patches(), _quiet():
            order = sorted(range(ds.num_scenes()), key=lambda i: natural_key(str(ds._scene_index[i])))
            for i in order:
                td_scene = ds.get_scene(i)
                if names is not None and td_scene.name not in names:
                    continue
                map_id = f"{td_scene.env_name}:{td_scene.location}"
                if map_id not in maps:
                    maps[map_id] = self._convert_map(ds, map_id)
                cache = DataFrameCache(ds.cache_path, td_scene)
                scenes.append(_convert_scene(td_scene, cache, split, map_id, maps[map_id]))
        return scenes, maps

    @staticmethod
    def _convert_map(ds, map_id: str) -> MapData:
        try:
            vec_map = ds._map_api.get_map(map_id, incl_road_lanes=True, incl_road_areas=True,
                                          incl_ped_crosswalks=True, incl_ped_walkways=True)
        except Exception as e:  # trajdata raises bare exceptions for maps it cannot find
            raise CorruptDataError(f"trajdata has no map {map_id!r}: {type(e).__name__}: {e}.") from e
        return vector_map_to_map_data(vec_map, map_id)


# ----------------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------------

def _convert_scene(td_scene, cache, split: str, map_id: str, map_data: MapData) -> Scene:
    """A trajdata scene + its DataFrameCache -> our ``Scene`` (arrays filled in one vectorised pass)."""
    agents = sorted(td_scene.agents, key=lambda a: natural_key(a.name))
    names = [a.name for a in agents]
    num_agents, num_steps = len(agents), td_scene.length_timesteps
    df = cache.scene_data_df
    row_agent = df.index.get_level_values(0).map({n: i for i, n in enumerate(names)}).to_numpy()
    row_step = df.index.get_level_values(1).to_numpy()
    keep = (row_step >= 0) & (row_step < num_steps) & ~np.isnan(row_agent.astype(float))
    a_idx, t_idx = row_agent[keep].astype(int), row_step[keep].astype(int)

    traj = np.zeros((num_agents, num_steps, 5), np.float32)
    valid = np.zeros((num_agents, num_steps), bool)
    cols = ["x", "y", "heading", "vx", "vy"]
    values = df[cols].to_numpy(np.float64)[keep]
    values[:, 2] = wrap_angle(values[:, 2])
    finite = np.isfinite(values).all(axis=1)  # a NaN sample is a missing sample, never a value
    traj[a_idx[finite], t_idx[finite]] = values[finite]
    valid[a_idx[finite], t_idx[finite]] = True

    extent = np.array([[a.extent.length, a.extent.width] for a in agents], np.float32).reshape(num_agents, 2) \
        if all(hasattr(a.extent, "length") for a in agents) else _variable_extents(df, names)
    agent_type = np.array([_TYPE_FROM_TRAJDATA.get(int(a.type), AgentType.OTHER) for a in agents], np.int8)
    tl_lane, tl_state = _traffic_lights(cache, map_data, num_steps)
    scene = Scene(
        scene_id=td_scene.name, dataset=td_scene.env_name, split=split, map_id=map_id, dt=float(td_scene.dt),
        agent_ids=np.array(names, dtype=str), agent_type=agent_type, extent=extent, trajectory=traj,
        valid=valid, ego_index=choose_ego(names, agent_type, traj, valid), tl_lane=tl_lane, tl_state=tl_state,
    )
    scene.validate()
    return scene


def _variable_extents(df, names: list[str]) -> np.ndarray:
    """Median length/width per agent for datasets whose extents vary over time."""
    med = df[["length", "width"]].groupby(level=0).median()
    return med.reindex(names).fillna(0.0).to_numpy(np.float32)


def _traffic_lights(cache, map_data: MapData, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-lane signal states from trajdata's traffic-light cache, where the dataset has one."""
    empty = np.zeros((0,), np.int32), np.zeros((0, num_steps), np.int8)
    if not cache.is_traffic_light_data_cached():
        return empty
    status = cache.get_traffic_light_status_dict()
    lane_index = {sid: i for i, sid in enumerate(map_data.source_id)
                  if map_data.polyline_type[i] == PolylineType.LANE_CENTER}
    lanes = sorted({lane for lane, _ in status if str(lane) in lane_index}, key=lambda s: natural_key(str(s)))
    if not lanes:
        return empty
    row = {lane: k for k, lane in enumerate(lanes)}
    state = np.zeros((len(lanes), num_steps), np.int8)
    for (lane, ts), value in status.items():
        if lane in row and 0 <= ts < num_steps and int(value) > 0:  # NO_DATA (-1) / UNKNOWN (0) stay UNKNOWN
            state[row[lane], ts] = TrafficLightState(int(value))
    return np.array([lane_index[str(lane)] for lane in lanes], np.int32), state


def choose_ego(names: list[str], agent_type: np.ndarray, traj: np.ndarray, valid: np.ndarray) -> int:
    """The ego / SDC: the dataset's own ``ego`` agent if it has one; otherwise, deterministically, the vehicle
    observed at every step that travels furthest (ties: lowest index); -1 if no vehicle is always observed."""
    if "ego" in names:
        return names.index("ego")
    candidates = np.flatnonzero((agent_type == AgentType.VEHICLE) & valid.all(axis=1))
    if candidates.size == 0:
        return -1
    path = np.linalg.norm(np.diff(traj[candidates, :, :2], axis=1), axis=-1).sum(axis=1)
    return int(candidates[np.argmax(path)])


def vector_map_to_map_data(vec_map, map_id: str, max_spacing: float = MAX_POINT_SPACING) -> MapData:
    """trajdata ``VectorMap`` -> ``MapData``: lane centres (with the lane graph), deduplicated lane boundaries,
    road edges (boundary of the road areas if the map has them, else of the union of lane polygons),
    crosswalks and walkways. Every polyline is densified to ``max_spacing`` (workaround 5)."""
    from trajdata.maps.vec_map_elements import MapElementType

    polylines: list[np.ndarray] = []
    types: list[int] = []
    sources: list[str] = []

    def add(points: np.ndarray, kind: PolylineType, source: str = "") -> None:
        pts = densify_polyline(np.asarray(points, np.float64)[:, :2], max_spacing)
        if len(pts) >= 2:
            polylines.append(pts)
            types.append(int(kind))
            sources.append(source)

    lanes = sorted(vec_map.elements[MapElementType.ROAD_LANE].values(), key=lambda e: natural_key(e.id))
    for lane in lanes:
        add(lane.center.points, PolylineType.LANE_CENTER, lane.id)
    lane_index = {sid: i for i, sid in enumerate(sources)}

    seen: set[bytes] = set()
    lane_polygons = []
    for lane in lanes:
        edges = [e for e in (lane.left_edge, lane.right_edge) if e is not None]
        for edge in edges:
            pts = np.round(np.asarray(edge.points)[:, :2], 3)
            key, rkey = pts.tobytes(), pts[::-1].copy().tobytes()
            if key not in seen and rkey not in seen:
                seen.add(key)
                add(edge.points, PolylineType.LANE_BOUNDARY, lane.id)
        if len(edges) == 2:
            ring = np.concatenate([edges[0].points[:, :2], edges[1].points[::-1, :2]])
            if len(ring) >= 3:
                lane_polygons.append(Polygon(ring).buffer(0))

    road_areas = list(vec_map.elements[MapElementType.ROAD_AREA].values())
    if road_areas:
        drivable = shapely.union_all([Polygon(a.exterior_polygon.points[:, :2],
                                              [h.points[:, :2] for h in a.interior_holes]).buffer(0)
                                      for a in road_areas])
    elif lane_polygons:
        drivable = shapely.union_all([p.buffer(_SLIVER_M, join_style="mitre") for p in lane_polygons]).buffer(
            -_SLIVER_M, join_style="mitre")
    else:
        drivable = None
    for ring in _road_edge_rings(drivable):
        add(ring, PolylineType.ROAD_EDGE)

    for cw in sorted(vec_map.elements[MapElementType.PED_CROSSWALK].values(), key=lambda e: natural_key(e.id)):
        add(_closed(cw.polygon.points), PolylineType.CROSSWALK, cw.id)
    for ww in sorted(vec_map.elements[MapElementType.PED_WALKWAY].values(), key=lambda e: natural_key(e.id)):
        add(_closed(ww.polygon.points), PolylineType.WALKWAY, ww.id)

    def graph(attr: str) -> np.ndarray:
        pairs = [(lane_index[lane.id], lane_index[other]) for lane in lanes
                 for other in sorted(getattr(lane, attr), key=natural_key) if other in lane_index]
        return np.array(pairs, np.int32).reshape(-1, 2)

    offsets = np.zeros(len(polylines) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in polylines])
    points = np.concatenate(polylines).astype(np.float32) if polylines else np.zeros((0, 2), np.float32)
    return MapData(
        map_id=map_id, points=points, offsets=offsets, polyline_type=np.array(types, np.int8),
        source_id=np.array(sources, dtype=str), successors=graph("next_lanes"),
        left_neighbors=graph("adj_lanes_left"), right_neighbors=graph("adj_lanes_right"), max_spacing=max_spacing,
    )


def _closed(points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points)[:, :2]
    return pts if np.allclose(pts[0], pts[-1]) else np.concatenate([pts, pts[:1]])


def _road_edge_rings(drivable) -> Iterator[np.ndarray]:
    """Rings bounding the drivable area, oriented with the drivable area on their left (exteriors
    counter-clockwise, holes clockwise); slivers below ``_MIN_HOLE_M2`` are dropped."""
    if drivable is None or drivable.is_empty:
        return
    polygons = list(getattr(drivable, "geoms", [drivable]))
    for poly in sorted(polygons, key=lambda p: (-p.area, p.bounds)):
        if not isinstance(poly, Polygon) or poly.area < _MIN_HOLE_M2:
            continue
        poly = orient(poly, sign=1.0)
        yield np.asarray(poly.exterior.coords)
        for hole in poly.interiors:
            if Polygon(hole).area >= _MIN_HOLE_M2:
                yield np.asarray(hole.coords)
