"""The trajdata pipeline on a hand-built INTERACTION-layout dataset: exact values, workarounds, bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from shapely.geometry import Polygon

from envs.data import open_dataset
from envs.data.scene_cache import load_scene
from envs.data.trajdata_source import MAX_POINT_SPACING, TrajdataSource, choose_ego
from envs.errors import CorruptDataError, DatasetNotFoundError, SplitNotFoundError, UnknownNameError
from envs.types import AgentType, PolylineType
from tests import interaction_fixture as fixture


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return fixture.write_dataset(tmp_path_factory.mktemp("tiny"), cases=2, case_length=91)


@pytest.fixture(scope="module")
def tiny_val(tiny_dir, tmp_path_factory):
    src = TrajdataSource("interaction_multi", tiny_dir, tmp_path_factory.mktemp("work"), case_length=91)
    return src.load_split("val")


# ---- exact values ------------------------------------------------------------------------------------------

def test_scenes_match_the_csv_exactly(tiny_val):
    scenes, _ = tiny_val
    assert [s.scene_id for s in scenes] == ["DR_USA_Tiny_Road_val_0", "DR_USA_Tiny_Road_val_1"]
    for case, s in enumerate(scenes, start=1):
        assert s.num_steps == 91
        assert s.dt == pytest.approx(0.1)
        assert s.agent_ids.tolist() == [f"{case - 1}_1", f"{case - 1}_2", f"{case - 1}_3"]
        assert s.agent_type.tolist() == [AgentType.VEHICLE, AgentType.VEHICLE, AgentType.PEDESTRIAN]
        np.testing.assert_allclose(s.extent[:2], [[4.5, 1.8], [5.0, 2.0]], atol=1e-6)
        assert s.valid.sum(axis=1).tolist() == [91, 50, 81]
        assert not s.valid[1, 50:].any()
        assert not s.valid[2, :10].any()
        t = np.arange(91) * 0.1
        speed = 10.0 + case
        np.testing.assert_allclose(s.trajectory[0, :, 0], 5.0 + speed * t, atol=1e-3)
        np.testing.assert_allclose(s.trajectory[0, :, 3], speed, atol=1e-6)
        np.testing.assert_allclose(s.trajectory[0, :, [1, 2, 4]], 0.0, atol=1e-6)
        np.testing.assert_allclose(s.trajectory[1, :50, 1], fixture.LANE_WIDTH, atol=1e-6)
        assert np.all(s.trajectory[~s.valid] == 0)  # missing means masked zeros, never NaN
        assert s.ego_index == 0  # the only vehicle observed at every step


def test_map_lane_graph_boundaries_and_road_edge(tiny_val):
    _, maps = tiny_val
    m = maps["interaction_multi:USA_Tiny_Road"]
    lanes = np.flatnonzero(m.polyline_type == PolylineType.LANE_CENTER)
    assert len(lanes) == 3
    assert m.count(PolylineType.LANE_BOUNDARY) == 5  # the shared middle line appears once
    start = {i: m.polyline(i)[0] for i in lanes}
    lane0 = next(i for i in lanes if np.allclose(start[i], [0, 0], atol=1e-3))
    lane1 = next(i for i in lanes if np.allclose(start[i], [0, 3.5], atol=1e-3))
    lane2 = next(i for i in lanes if np.allclose(start[i], [100, 0], atol=1e-3))
    assert m.successors.tolist() == [[lane0, lane2]]
    assert m.left_neighbors.tolist() == [[lane0, lane1]]
    assert m.right_neighbors.tolist() == [[lane1, lane0]]
    edges = m.polylines_of(PolylineType.ROAD_EDGE)
    assert len(edges) == 1
    ring = Polygon(edges[0])
    assert ring.area == pytest.approx(100 * 7.0 + 50 * 3.5, rel=1e-3)
    # Drivable area on the left: the exterior ring runs counter-clockwise (positive shoelace area).
    x, y = edges[0][:, 0], edges[0][:, 1]
    assert 0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) > 0


def test_trajdata_map_cache_round_trips_under_the_installed_protobuf(tmp_path):
    # The Makefile installs protobuf >= 6 for TensorBoard over trajdata's protobuf==3.19.4 pin (README,
    # "Installation"): trajdata's generated map proto must still write and read its map cache.
    import google.protobuf
    from trajdata.proto import vectorized_map_pb2

    src = TrajdataSource("interaction_multi", fixture.write_dataset(tmp_path / "data", cases=1, case_length=91),
                         tmp_path / "work", case_length=91)
    src.load_split("val")
    files = sorted((tmp_path / "work").rglob("*.pb"))
    assert files, f"no map cache written by trajdata (protobuf {google.protobuf.__version__})"
    for path in files:
        m = vectorized_map_pb2.VectorizedMap()
        m.ParseFromString(path.read_bytes())
        assert len(m.elements) > 0
        again = vectorized_map_pb2.VectorizedMap()
        again.ParseFromString(m.SerializeToString())
        assert again == m


def test_choose_ego_prefers_named_ego_then_longest_always_valid_vehicle():
    traj = np.zeros((3, 4, 5), np.float32)
    traj[1, :, 0] = [0, 1, 2, 3]
    traj[2, :, 0] = [0, 2, 4, 6]
    valid = np.ones((3, 4), bool)
    types = np.array([AgentType.VEHICLE, AgentType.VEHICLE, AgentType.PEDESTRIAN], np.int8)
    assert choose_ego(["a", "b", "c"], types, traj, valid) == 1  # c moves more but is not a vehicle
    assert choose_ego(["a", "ego", "c"], types, traj, valid) == 1
    valid[:, 0] = False
    assert choose_ego(["a", "b", "c"], types, traj, valid) == -1


# ---- trajdata 1.4.0 workarounds -----------------------------------------------------------------------------

def test_numpy2_string_alias_is_installed_on_import(tiny_val):
    assert np.__version__.split(".")[0] != "2" or np.string_ is np.bytes_


def test_long_cases_need_case_length_and_get_a_clear_error(tiny_dir, tmp_path):
    with pytest.raises(CorruptDataError, match="case_length=40"):
        TrajdataSource("interaction_multi", tiny_dir, tmp_path / "w").load_split("val")


def test_full_length_test_split_loads(tmp_path):
    # The stock loader gives every "test" case the 10-frame length of the real challenge's *_obs files.
    root = fixture.write_dataset(tmp_path / "d", cases=2, splits=("test",))
    scenes, _ = TrajdataSource("interaction_multi", root, tmp_path / "w", case_length=91).load_split("test")
    assert [s.num_steps for s in scenes] == [91, 91]
    assert scenes[0].valid.sum(axis=1).tolist() == [91, 50, 81]


def test_rebuilding_over_an_existing_trajdata_cache_works(tiny_dir, tmp_path):
    # zarr 3 raises ContainsArrayError when trajdata re-caches maps over an existing cache.
    src = TrajdataSource("interaction_multi", tiny_dir, tmp_path / "w", case_length=91)
    first, _ = src.load_split("train")
    second, _ = src.load_split("train")
    assert [s.scene_id for s in first] == [s.scene_id for s in second]


def test_only_present_map_locations_are_loaded(tiny_val):
    # The stock loader would try to preload the 18 real INTERACTION maps and fail on the first one.
    _, maps = tiny_val
    assert list(maps) == ["interaction_multi:USA_Tiny_Road"]


def test_sparse_lanes_are_densified(tmp_path):
    root = fixture.write_dataset(tmp_path / "sparse", cases=1, sparse=True, splits=("val",))
    scenes, maps = TrajdataSource("interaction_multi", root, tmp_path / "w", case_length=91).load_split("val")
    m = maps["interaction_multi:USA_Tiny_Road"]
    for i in range(m.num_polylines):
        gaps = np.linalg.norm(np.diff(m.polyline(i), axis=0), axis=1)
        assert gaps.max() <= MAX_POINT_SPACING + 1e-5
    # Every logged vehicle position has a lane-centre point within half the spacing along the lane.
    centres = np.concatenate(m.polylines_of(PolylineType.LANE_CENTER))
    s = scenes[0]
    xy = s.trajectory[:2, :, :2][s.valid[:2]]
    d = np.linalg.norm(xy[:, None] - centres[None], axis=-1).min(axis=1)
    assert d.max() <= MAX_POINT_SPACING / 2 + 1e-3


# ---- bad input ------------------------------------------------------------------------------------------------

def test_missing_and_empty_data_dirs(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        TrajdataSource("interaction_multi", tmp_path / "nope", tmp_path / "w")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="No track CSV"):
        TrajdataSource("interaction_multi", tmp_path / "empty", tmp_path / "w")
    with pytest.raises(DatasetNotFoundError, match="needs data_dir"):
        open_dataset("nusc_mini", "mini_val", cache_dir=tmp_path / "c")


def test_unknown_dataset_names_suggest_the_nearest(tmp_path):
    with pytest.raises(UnknownNameError, match="Did you mean 'interaction_multi'"):
        TrajdataSource("interaction_mutli", tmp_path, tmp_path / "w")
    with pytest.raises(UnknownNameError, match="Did you mean 'towns'"):
        open_dataset("town", "val", cache_dir=tmp_path / "c")


def test_unknown_split_lists_the_available_ones(tiny_dir, tmp_path):
    with pytest.raises(SplitNotFoundError, match="Available splits: train, val"):
        TrajdataSource("interaction_multi", tiny_dir, tmp_path / "w", case_length=91).load_split("tset")


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_track_csv_is_named(tmp_path, damage):
    root = fixture.write_dataset(tmp_path / "d", cases=1, splits=("val",))
    csv = root / "val" / "DR_USA_Tiny_Road_val.csv"
    text = csv.read_text()
    csv.write_text(text[: len(text) // 2 + 7] if damage == "truncate" else "a,b,c\n" + text.split("\n", 1)[1])
    with pytest.raises(CorruptDataError, match="DR_USA_Tiny_Road_val.csv"):
        TrajdataSource("interaction_multi", root, tmp_path / "w", case_length=91).load_split("val")


def test_corrupt_osm_is_named(tmp_path):
    root = fixture.write_dataset(tmp_path / "d", cases=1, splits=("val",))
    osm = root / "maps" / "DR_USA_Tiny_Road.osm"
    osm.write_text(osm.read_text()[:500])
    with pytest.raises(CorruptDataError, match="DR_USA_Tiny_Road.osm"):
        TrajdataSource("interaction_multi", root, tmp_path / "w", case_length=91).load_split("val")


# ---- the scene cache -------------------------------------------------------------------------------------------

@pytest.fixture()
def cached(tiny_dir, tmp_path):
    return open_dataset("interaction_multi", "val", data_dir=tiny_dir, cache_dir=tmp_path / "cache", case_length=91)


def test_cache_round_trip_equals_the_source(cached, tiny_val):
    scenes, maps = tiny_val
    assert len(cached) == 2
    assert cached.scene_ids == [s.scene_id for s in scenes]
    for s, c in zip(scenes, cached, strict=True):
        for name in ("agent_ids", "agent_type", "extent", "trajectory", "valid", "tl_lane", "tl_state"):
            np.testing.assert_array_equal(getattr(s, name), getattr(c, name))
        assert c.ego_index == s.ego_index
        assert c.map is cached.map(c.map_id)
    m, c = maps["interaction_multi:USA_Tiny_Road"], cached.map("interaction_multi:USA_Tiny_Road")
    np.testing.assert_array_equal(m.points, c.points)
    np.testing.assert_array_equal(m.successors, c.successors)
    assert cached["DR_USA_Tiny_Road_val_1"].scene_id == "DR_USA_Tiny_Road_val_1"
    with pytest.raises(UnknownNameError, match="Did you mean 'DR_USA_Tiny_Road_val_1'"):
        cached["DR_USA_Tiny_Road_val_11"]
    with pytest.raises(IndexError, match="out of range"):
        cached[5]


def test_cache_info_counts(cached):
    info = cached.info()
    assert info["scenes"] == 2
    assert info["scene_length_steps"] == 91
    assert info["scene_length_s"] == 9.1
    assert info["agents_per_type"] == {"vehicle": 4, "pedestrian": 2, "cyclist": 0, "other": 0}
    assert info["mean_agents_per_scene"] == 3.0
    assert info["maps"]["interaction_multi:USA_Tiny_Road"]["lanes"] == 3


def test_corrupt_cache_entry_is_rebuilt_not_used(cached):
    reference = cached[0]
    path = cached._cache.root / cached._entries[0]["file"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="Rebuilding"):
        rebuilt = cached[0]
    np.testing.assert_array_equal(rebuilt.trajectory, reference.trajectory)
    load_scene(path)  # the file on disk is whole again
    # A flipped byte inside an array fails the zip CRC check rather than serving wrong numbers.
    data = bytearray(path.read_bytes())
    pos = data.find(b"\x00\x00\xa0\x40")  # 5.0 as float32: the first x of agent 0
    assert pos > 0
    data[pos + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="Rebuilding"):
        np.testing.assert_array_equal(cached[0].trajectory, reference.trajectory)


def test_corrupt_index_and_changed_source_rebuild(tiny_dir, tmp_path):
    ds = open_dataset("interaction_multi", "val", data_dir=tiny_dir, cache_dir=tmp_path / "c", case_length=91)
    index = ds._cache.root / "index.json"
    index.write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt"):
        again = open_dataset("interaction_multi", "val", data_dir=tiny_dir, cache_dir=tmp_path / "c", case_length=91)
    assert len(again) == 2
    assert json.loads(index.read_text())["splits"]["val"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warm open is silent
        open_dataset("interaction_multi", "val", data_dir=tiny_dir, cache_dir=tmp_path / "c", case_length=91)


def test_source_change_invalidates_the_cache(tmp_path):
    root = fixture.write_dataset(tmp_path / "d", cases=1, splits=("val",))
    ds = open_dataset("interaction_multi", "val", data_dir=root, cache_dir=tmp_path / "c", case_length=91)
    assert len(ds) == 1
    fixture.write_dataset(root, cases=3, splits=("val",))
    assert len(open_dataset("interaction_multi", "val", data_dir=root, cache_dir=tmp_path / "c", case_length=91)) == 3


def test_map_index_is_cached_on_disk_and_rebuilt_when_corrupt(cached):
    from envs.map_index import build_map_index

    map_id = "interaction_multi:USA_Tiny_Road"
    first = cached.map_index(map_id)
    path = cached._cache.root / "maps" / "interaction_multi_USA_Tiny_Road.index.npz"
    assert path.exists()
    reference = build_map_index(cached.map(map_id))
    np.testing.assert_allclose(first.sdf, reference.sdf, atol=0.02)  # stored as float16
    np.testing.assert_array_equal(first.chunks, reference.chunks)
    path.write_bytes(path.read_bytes()[:100])
    fresh = open_dataset("interaction_multi", "val", data_dir=cached._cache.data_dir,
                         cache_dir=cached._cache.root.parent, case_length=91)
    with pytest.warns(UserWarning, match="Rebuilding"):
        again = fresh.map_index(map_id)
    np.testing.assert_allclose(again.sdf, reference.sdf, atol=0.02)
