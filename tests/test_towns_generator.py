"""Tests of the towns dataset generator (envs/data/towns).

The default run needs no SUMO: it materialises the committed assets and checks layout, format, counts,
integrity checks, the FCD conversion and the Lanelet2 maps. Regeneration tests are marked ``sumo`` and
``slow``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import envs.data.towns.generate as gen
from envs.data.towns import (
    TOWN_NAMES,
    SumoNotAvailableError,
    UnwritableDirectoryError,
    ensure_towns,
    generate_towns,
    verify_towns,
)
from envs.data.towns.interaction_csv import (
    CASE_LENGTH,
    CSV_HEADER,
    SplitRun,
    full_window_starts,
    iter_csv_chunks,
    pack_run,
    unpack_run,
)
from envs.data.towns.simulate import RunTracks, front_path_to_box, parse_fcd, sumo_heading
from envs.errors import CorruptDataError, DatasetNotFoundError, UnknownNameError

SPLITS = ("train", "val", "test")
COLUMNS = CSV_HEADER.strip().split(",")
ROW_RE = re.compile(r"^\d+,\d+,\d+,\d+,car(,-?\d+\.\d{3}){7}$")


@pytest.fixture(scope="module")
def towns_root(tmp_path_factory) -> Path:
    return ensure_towns(tmp_path_factory.mktemp("towns") / "data")


@pytest.fixture(scope="module")
def manifest(towns_root) -> dict:
    return json.loads((towns_root / "towns.json").read_text())


@pytest.fixture(scope="module")
def tables(towns_root) -> dict[tuple[str, str], pd.DataFrame]:
    out = {}
    for town in TOWN_NAMES:
        for split in SPLITS:
            out[(town, split)] = pd.read_csv(towns_root / split / f"DR_{town}_{split}.csv", engine="pyarrow")
    return out


def _lines(path: Path, n: int) -> list[str]:
    with open(path) as fh:
        return [next(fh).rstrip("\n") for _ in range(n)]


def _last_line(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(-200, 2)
        return fh.read().decode().rstrip("\n").rsplit("\n", 1)[-1]


# --------------------------------------------------------------------------------------------------
# Materialised layout, manifest and content (no SUMO)
# --------------------------------------------------------------------------------------------------


def test_town_names_are_interaction_locations():
    assert len(TOWN_NAMES) >= 4
    for name in TOWN_NAMES:
        tokens = name.split("_")
        assert len(tokens) == 3, name
        assert tokens[0] == "USA", name
    assert {"USA_Town_Grid", "USA_Town_Spider", "USA_Town_Random", "USA_Town_Roundabout"} <= set(TOWN_NAMES)


def test_layout_is_exactly_the_manifest(towns_root, manifest):
    on_disk = {p.relative_to(towns_root).as_posix() for p in towns_root.rglob("*") if p.is_file()}
    expected = {f"maps/DR_{t}.osm" for t in TOWN_NAMES}
    expected |= {f"{s}/DR_{t}_{s}.csv" for t in TOWN_NAMES for s in SPLITS}
    assert set(manifest["files"]) == expected
    assert on_disk == expected | {"towns.json"}
    assert verify_towns(towns_root) == manifest


def test_manifest_fields(manifest):
    assert manifest["format"] == "interaction-prediction"
    assert manifest["case_length"] == CASE_LENGTH == 91
    assert manifest["dt"] == 0.1
    assert manifest["seed"] == 0
    assert manifest["sumo_version"] == "1.28.0"
    assert manifest["towns"] == list(TOWN_NAMES)
    assert manifest["generator_version"] == gen.GENERATOR_VERSION
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in manifest["files"].values())


def test_case_counts_and_agents_meet_targets(manifest, tables):
    totals = {s: sum(manifest["cases"][s].values()) for s in SPLITS}
    assert totals["train"] >= 1000, totals
    assert totals["val"] >= 100, totals
    assert totals["test"] >= 100, totals
    agents = [df.groupby("case_id")["track_id"].nunique() for df in tables.values()]
    assert np.concatenate([a.to_numpy() for a in agents]).mean() >= 20
    for (town, split), df in tables.items():
        assert df["case_id"].max() == manifest["cases"][split][town]


def test_csv_text_format(towns_root):
    for town in TOWN_NAMES:
        for split in SPLITS:
            path = towns_root / split / f"DR_{town}_{split}.csv"
            head = _lines(path, 200)
            assert head[0] + "\n" == CSV_HEADER
            assert all(ROW_RE.match(line) for line in head[1:]), head[1:3]
            last = _last_line(path)
            assert ROW_RE.match(last)
            # trajdata reads the number of cases from the first field of the last line.
            df_max = int(last.split(",")[0])
            assert df_max == gen.json.loads((towns_root / "towns.json").read_text())["cases"][split][town]


def test_csv_rows_cases_and_tracks(tables):
    for (town, split), df in tables.items():
        assert list(df.columns) == COLUMNS
        assert (df["agent_type"] == "car").all()
        key = df[["case_id", "track_id", "frame_id"]].to_numpy()
        order = np.lexsort((key[:, 2], key[:, 1], key[:, 0]))
        assert np.array_equal(order, np.arange(len(df))), f"{town} {split}: rows not sorted"
        cases = df["case_id"].unique()
        assert np.array_equal(cases, np.arange(1, len(cases) + 1)), "case ids not contiguous from 1"
        assert df["frame_id"].between(1, CASE_LENGTH).all()
        assert (df["timestamp_ms"] == df["frame_id"] * 100).all()
        assert df["psi_rad"].between(-math.pi, math.pi).all()
        assert (df["length"] >= 4.0).all()
        assert (df["width"] >= 1.7).all()
        per_track = df.groupby(["case_id", "track_id"])["frame_id"].agg(["count", "min", "max"])
        # Tracks are contiguous inside a case and numbered 1..n.
        assert ((per_track["max"] - per_track["min"] + 1) == per_track["count"]).all()
        ids = per_track.reset_index().groupby("case_id")["track_id"].agg(["min", "max", "count"])
        assert (ids["min"] == 1).all()
        assert (ids["max"] == ids["count"]).all()
        # Every case has a vehicle valid in all 91 frames.
        full = per_track["count"].eq(CASE_LENGTH).groupby(level=0).any()
        assert full.all(), f"{town} {split}: cases without a full-length vehicle: {list(full[~full].index)[:5]}"
        # Box size is constant along a track (it comes from the vType).
        assert (df.groupby(["case_id", "track_id"])[["length", "width"]].nunique() == 1).all().all()


@pytest.mark.parametrize("town", TOWN_NAMES)
def test_heading_and_velocity_match_motion(tables, town):
    df = tables[(town, "val")]
    same_track = (df["case_id"].diff() == 0) & (df["track_id"].diff() == 0)
    dx, dy = df["x"].diff()[same_track], df["y"].diff()[same_track]
    vx, vy = df["vx"][same_track], df["vy"][same_track]
    psi = df["psi_rad"][same_track]
    # Speed * 0.1 s explains the displacement (lateral lane-change motion and 1 mm rounding aside).
    assert np.median(np.hypot(dx - 0.1 * vx, dy - 0.1 * vy)) < 0.02
    moving = np.hypot(dx, dy) > 0.5  # > 5 m/s: heading well defined by the motion
    err = np.angle(np.exp(1j * (np.arctan2(dy[moving], dx[moving]) - psi[moving])))
    assert np.median(np.abs(err)) < 0.02
    assert np.quantile(np.abs(err), 0.99) < 0.3
    # Velocity points along the heading (SUMO speed is along the vehicle axis).
    speed = np.hypot(vx, vy)
    fast = speed > 1.0
    along = np.angle(np.exp(1j * (np.arctan2(vy[fast], vx[fast]) - psi[fast])))
    assert np.abs(along).max() < 2e-3


def test_boxes_do_not_slip_sideways_and_turn_boundedly(tables):
    """Committed data (val, all towns): the centre moves along the heading (no sideways slip), yaw rate bounded.

    Sideways slip is the step's displacement perpendicular to the mean heading of the step (1 mm rounding
    included). The yaw-rate bound is what the towns' geometry allows, not a comfort limit: some lane
    shapes kink inside junctions (a road bending by up to ~60 degrees within a metre in USA_Town_Random)
    and SUMO drives them at up to ~11 m/s; a box towed at L/2 then turns at up to speed / (L/2).
    """
    yaw, side = [], []
    for town in TOWN_NAMES:
        df = tables[(town, "val")]
        same = ((df["case_id"].diff() == 0) & (df["track_id"].diff() == 0)).to_numpy()[1:]
        x, y, h = df["x"].to_numpy(), df["y"].to_numpy(), df["psi_rad"].to_numpy()
        dh = np.angle(np.exp(1j * np.diff(h)))
        mean_h = h[:-1] + 0.5 * dh
        yaw.append(np.abs(dh[same]) / 0.1)
        side.append(np.abs(-np.diff(x) * np.sin(mean_h) + np.diff(y) * np.cos(mean_h))[same])
    yaw, side = np.concatenate(yaw), np.concatenate(side)
    assert np.quantile(side, 0.999) < 0.05
    assert side.max() < 0.15
    assert np.quantile(yaw, 0.5) < 0.01
    assert np.quantile(yaw, 0.999) < 2.0
    assert yaw.max() < 5.0


@pytest.mark.parametrize("town", TOWN_NAMES)
def test_splits_are_separate_runs(tables, town):
    cols = ["x", "y", "vx", "vy", "psi_rad"]
    rows = {s: np.unique(pd.util.hash_pandas_object(tables[(town, s)][cols], index=False).to_numpy())
            for s in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = np.isin(rows[b], rows[a]).mean()
        assert shared < 0.01, f"{town}: {shared:.1%} of {b} states also appear in {a}"


# --------------------------------------------------------------------------------------------------
# Integrity: corrupt assets, tampered copies, idempotence
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def asset_copy(tmp_path, monkeypatch) -> Path:
    copy = tmp_path / "assets"
    shutil.copytree(gen.ASSETS_DIR, copy)
    monkeypatch.setattr(gen, "ASSETS_DIR", copy)
    return copy


@pytest.mark.parametrize("victim", ["DR_USA_Town_Roundabout_val.tracks.xz", "DR_USA_Town_Grid.osm.xz", "towns.json"])
def test_corrupt_asset_raises(asset_copy, tmp_path, victim):
    path = asset_copy / victim
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CorruptDataError, match=re.escape(victim)) as err:
        ensure_towns(tmp_path / "root")
    assert "make data" in str(err.value)
    assert not (tmp_path / "root" / "towns.json").exists()


def test_edited_asset_byte_raises(asset_copy, tmp_path):
    path = asset_copy / "DR_USA_Town_Spider_test.tracks.xz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="DR_USA_Town_Spider_test.tracks.xz"):
        ensure_towns(tmp_path / "root")


def test_missing_assets_raise_not_found(asset_copy, tmp_path):
    (asset_copy / "packed.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="make data"):
        ensure_towns(tmp_path / "root")


def test_tampered_materialised_copy_is_detected_and_repaired(towns_root, manifest):
    rel_csv = "val/DR_USA_Town_Roundabout_val.csv"
    rel_map = "maps/DR_USA_Town_Roundabout.osm"
    csv_path, map_path = towns_root / rel_csv, towns_root / rel_map
    text = csv_path.read_text()
    csv_path.write_text(text.replace(",car,", ",car,1", 1))  # edited value
    map_path.write_bytes(map_path.read_bytes()[:1000])  # truncated
    with pytest.raises(CorruptDataError, match="DR_USA_Town_Roundabout") as err:
        verify_towns(towns_root)
    assert rel_csv in str(err.value)
    assert rel_map in str(err.value)
    assert ensure_towns(towns_root) == towns_root
    assert verify_towns(towns_root) == manifest
    assert csv_path.read_text() == text
    (towns_root / rel_csv).unlink()  # a deleted file is restored as well
    ensure_towns(towns_root)
    assert verify_towns(towns_root) == manifest


def test_ensure_is_idempotent(towns_root):
    before = {p: p.stat().st_mtime_ns for p in towns_root.rglob("*") if p.is_file()}
    assert ensure_towns(towns_root) == towns_root
    after = {p: p.stat().st_mtime_ns for p in towns_root.rglob("*") if p.is_file()}
    assert before == after


def test_default_root_uses_trafficgym_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAFFICGYM_HOME", str(tmp_path / "home"))
    assert gen.default_root() == tmp_path / "home" / "data" / "towns"
    monkeypatch.delenv("TRAFFICGYM_HOME")
    assert gen.default_root() == Path("~/.cache/trafficgym").expanduser() / "data" / "towns"


def test_ensure_refuses_unrelated_nonempty_dir(tmp_path):
    (tmp_path / "mine.txt").write_text("not a dataset")
    with pytest.raises(UnwritableDirectoryError, match="refusing"):
        ensure_towns(tmp_path)
    assert (tmp_path / "mine.txt").exists()


def test_unwritable_dirs_raise(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UnwritableDirectoryError, match="Cannot write"):
        ensure_towns(blocker / "sub" / "towns")
    with pytest.raises(UnwritableDirectoryError, match="Cannot write"):
        generate_towns(blocker / "sub" / "out")


def test_generate_rejects_bad_input(tmp_path):
    with pytest.raises(UnknownNameError, match="Did you mean 'USA_Town_Grid'"):
        generate_towns(tmp_path / "out", towns=["USA_Town_Gird"])
    with pytest.raises(ValueError, match="seed"):
        generate_towns(tmp_path / "out", seed=-1)
    with pytest.raises(ValueError, match="compress=True"):
        generate_towns(gen.ASSETS_DIR, compress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(UnwritableDirectoryError, match="refusing"):
        generate_towns(tmp_path / "busy", towns=["USA_Town_Grid"])


def test_missing_sumo_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sumo", None)  # makes `import sumo` raise ImportError
    with pytest.raises(SumoNotAvailableError, match=re.escape("pip install -e '.[sumo]'")):
        generate_towns(tmp_path / "out", towns=["USA_Town_Grid"])


# --------------------------------------------------------------------------------------------------
# FCD conversion and CSV writing on hand-built data
# --------------------------------------------------------------------------------------------------


def test_sumo_heading_exact():
    # SUMO angle: degrees clockwise from north -> radians counter-clockwise from +x, in (-pi, pi].
    h = sumo_heading(np.array([0.0, 90.0, 180.0, 270.0, 45.0, 359.0]))
    np.testing.assert_allclose(h, [math.pi / 2, 0.0, -math.pi / 2, math.pi, math.pi / 4, math.radians(91)],
                               atol=1e-12)
    assert np.all((h > -math.pi) & (h <= math.pi))


def test_front_path_to_box_exact_on_l_shaped_path():
    """Front bumper drives 10 m east, turns a right-angle corner at (10, 0) and drives north, then stops.

    The centre is towed at L/2 = 2 m: on the first leg it is exactly 2 m behind the front; after the
    corner it follows the classical tractrix. With the front at (10, y), y = d t (d = L/2):
    centre = (10 - d sech t, y - d tanh t), heading = direction centre -> front. A second track checks
    the start along its own initial heading and that tracks do not mix.
    """
    d = 2.0
    east = np.stack([np.arange(0.0, 10.0, 0.1), np.zeros(100)], axis=1)
    north = np.stack([np.full(121, 10.0), np.arange(121) * 0.1], axis=1)  # (10, 0) .. (10, 12)
    track_a = np.concatenate([east, north, north[-1:], north[-1:]])  # stops for two steps at (10, 12)
    track_b = np.array([[100.0, 0.0], [100.0, 0.5], [100.0, 1.0]])  # northbound, inserted at 3 m/s
    front = np.concatenate([track_a, track_b])
    n_a = len(track_a)
    start = np.zeros(len(front), dtype=bool)
    start[[0, n_a]] = True
    a_rows = np.arange(len(front)) < n_a
    x, y, vx, vy, h = front_path_to_box(front[:, 0], front[:, 1], start, np.where(a_rows, 0.0, math.pi / 2),
                                        np.where(a_rows, 1.0, 3.0), np.where(a_rows, 2 * d, 4.0))
    got = np.stack([x, y], axis=1)

    # Always exactly L/2 behind the front bumper, heading along centre -> front.
    np.testing.assert_allclose(np.hypot(*(front - got).T), np.where(a_rows, d, 2.0), atol=1e-12)
    # First leg and the corner itself: exactly L/2 behind along +x.
    np.testing.assert_allclose(got[:101], east.tolist() + [[10.0, 0.0]] - np.array([d, 0.0]), atol=1e-12)
    np.testing.assert_allclose(h[:101], 0.0, atol=1e-12)
    # Second leg: the tractrix (pursuit in 12.5 mm sub-steps: within 5 mm / 5 mrad of the exact curve).
    t = north[:, 1] / d
    expect = np.stack([10.0 - d / np.cosh(t), north[:, 1] - d * np.tanh(t)], axis=1)
    np.testing.assert_allclose(got[100:221], expect, atol=5e-3)
    np.testing.assert_allclose(h[100:221], np.arctan2(d * np.tanh(t), d / np.cosh(t)), atol=5e-3)
    assert abs(h[220] - math.pi / 2) < 0.01  # 12 m after the corner the box points north
    # A towed box turns by at most (front's travel) / (L/2) per step.
    front_step = np.hypot(*np.diff(track_a, axis=0).T)
    assert np.all(np.abs(np.diff(h[:n_a])) <= front_step / d + 1e-12)
    step = np.hypot(np.diff(x), np.diff(y))[: n_a - 1]
    # Stopped: the box stays, the heading is kept, the speed is zero.
    np.testing.assert_array_equal(got[n_a - 2:n_a], got[[n_a - 3, n_a - 3]])
    np.testing.assert_array_equal(h[n_a - 2:n_a], h[[n_a - 3, n_a - 3]])
    speed = np.hypot(vx, vy)
    np.testing.assert_array_equal(speed[n_a - 2:n_a], 0.0)
    # Speed: SUMO's at insertion, else the backward difference of the centre; always along the heading.
    assert speed[0] == 1.0
    assert speed[n_a] == 3.0
    np.testing.assert_allclose(speed[1:n_a], step / 0.1, atol=1e-12)
    np.testing.assert_allclose(np.arctan2(vy, vx)[speed > 0], h[speed > 0], atol=1e-12)
    # No lateral slip of the centre: each step's displacement is along the mean heading.
    mean_h = h[: n_a - 1] + 0.5 * np.diff(h[:n_a])
    side = -np.diff(x[:n_a]) * np.sin(mean_h) + np.diff(y[:n_a]) * np.cos(mean_h)
    assert np.abs(side).max() < 1e-3
    # Second track: starts along its own initial heading (north), never influenced by track A.
    np.testing.assert_allclose(got[n_a:], [[100.0, -2.0], [100.0, -1.5], [100.0, -1.0]], atol=1e-12)
    np.testing.assert_allclose(h[n_a:], math.pi / 2, atol=1e-12)
    np.testing.assert_allclose(speed[n_a:], [3.0, 5.0, 5.0], atol=1e-12)


def test_front_path_to_box_smooth_on_a_gentle_curve():
    """On a smooth path the box turns smoothly and the centre moves along its heading."""
    t = np.arange(40) * 0.1
    front = np.stack([8.0 * t, 0.05 * (8.0 * t) ** 2 / 10], axis=1)  # a gentle left curve
    start = np.zeros(40, dtype=bool)
    start[0] = True
    x, y, vx, vy, h = front_path_to_box(front[:, 0], front[:, 1], start, np.zeros(40), np.full(40, 8.0),
                                        np.full(40, 4.6))
    yaw_rate = np.abs(np.diff(h)) / 0.1
    assert yaw_rate.max() < 0.2
    side = -np.diff(x) * np.sin(h[1:]) + np.diff(y) * np.cos(h[1:])
    assert np.abs(side).max() < 0.01


def test_fcd_file_to_case_csv_exact(tmp_path):
    """A hand-written SUMO FCD CSV -> tracks -> one case, checked line by line."""
    rows = ["timestep_time;vehicle_id;vehicle_x;vehicle_y;vehicle_angle;vehicle_type;vehicle_speed",
            "0.000;;;;;;"]  # SUMO writes an empty row for a step without vehicles
    for f in range(CASE_LENGTH + 1):  # warm-up step 0 is dropped; frames 1..91 are recorded
        t = f"{f / 10:.3f}"
        if f >= 1:
            rows.append(f"{t};0;{10.0 + 0.5 * f:.4f};5.0000;90.0000;car;5.0000")  # east, 4.60 m car
        if f in (2, 3):
            rows.append(f"{t};1;20.0000;{30.0 + 0.2 * (f - 2):.4f};0.0000;truck;2.0000")  # north, 8.50 m truck
        if f == 3:
            rows.append(f"{t};2;50.0000;0.0000;270.0000;car_small;1.0000")  # west, 4.10 m car
    fcd = tmp_path / "fcd.csv"
    fcd.write_text("\n".join(rows) + "\n")
    tracks = parse_fcd(fcd, warmup_s=0.1, num_frames=CASE_LENGTH)
    assert tracks.num_tracks == 3
    assert tracks.first_frame.tolist() == [0, 1, 2]
    assert tracks.num_track_frames.tolist() == [CASE_LENGTH, 2, 1]
    assert tracks.length_mm.tolist() == [4600, 8500, 4100]
    assert tracks.width_mm.tolist() == [1850, 2500, 1750]
    np.testing.assert_array_equal(tracks.values[0], [8200, 5000, 5000, 0, 0])  # 10.5 - 2.3
    np.testing.assert_array_equal(tracks.values[CASE_LENGTH], [20000, 25750, 0, 2000, 1571])
    np.testing.assert_array_equal(tracks.values[CASE_LENGTH + 1], [20000, 25950, 0, 2000, 1571])
    np.testing.assert_array_equal(tracks.values[-1], [52050, 0, -1000, 0, 3141])  # pi clipped to 3.141

    starts = full_window_starts(tracks, stride=10, max_cases=5)
    assert starts == [0]
    lines = "".join(iter_csv_chunks(SplitRun(tracks, tuple(starts)))).splitlines()
    assert lines[0] + "\n" == CSV_HEADER
    assert len(lines) == 1 + CASE_LENGTH + 2 + 1
    assert lines[1] == "1,1,1,100,car,8.200,5.000,5.000,0.000,0.000,4.600,1.850"
    assert lines[CASE_LENGTH] == "1,1,91,9100,car,53.200,5.000,5.000,0.000,0.000,4.600,1.850"
    assert lines[CASE_LENGTH + 1] == "1,2,2,200,car,20.000,25.750,0.000,2.000,1.571,8.500,2.500"
    assert lines[CASE_LENGTH + 2] == "1,2,3,300,car,20.000,25.950,0.000,2.000,1.571,8.500,2.500"
    assert lines[-1] == "1,3,3,300,car,52.050,0.000,-1.000,0.000,3.141,4.100,1.750"


def test_parse_fcd_uses_history_before_the_recording(tmp_path):
    """Boxes come from the whole track (warm-up included), so cutting the recording does not change them."""
    rows = ["timestep_time;vehicle_id;vehicle_x;vehicle_y;vehicle_angle;vehicle_type;vehicle_speed"]
    for f in range(8):  # a 4.10 m car driving east at 10 m/s, inserted at t = 0
        rows.append(f"{f / 10:.3f};0;{1.0 * f:.4f};0.0000;90.0000;car_small;10.0000")
    fcd = tmp_path / "fcd.csv"
    fcd.write_text("\n".join(rows) + "\n")
    whole = parse_fcd(fcd, warmup_s=0.0, num_frames=8)
    cut = parse_fcd(fcd, warmup_s=0.3, num_frames=5)
    np.testing.assert_array_equal(cut.values, whole.values[3:])
    # Inserted at x = 0: the rear starts on the backward extension, so the centre moves 1 m per step.
    np.testing.assert_array_equal(whole.values[:, 0], 1000 * np.arange(8) - 2050)
    np.testing.assert_array_equal(whole.values[:, 2], 10000)


def test_windows_without_full_length_vehicle_are_dropped():
    # Two 60-frame tracks that never cover a whole 91-frame window.
    values = np.zeros((120, 5), dtype=np.int64)
    tracks = RunTracks(200, np.array([0, 100]), np.array([60, 60]), np.array([4600, 4600]),
                       np.array([1850, 1850]), values)
    assert full_window_starts(tracks, stride=10, max_cases=10) == []


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 40)), min_size=1, max_size=6), st.integers(0, 2**31))
def test_pack_roundtrip(spans, seed):
    rng = np.random.default_rng(seed)
    first = np.array(sorted(s for s, _ in spans), dtype=np.int64)
    count = np.array([n for _, n in spans], dtype=np.int64)
    values = rng.integers(-600_000, 600_000, size=(int(count.sum()), 5))
    tracks = RunTracks(100, first, count, rng.integers(4000, 12000, len(first)), rng.integers(1700, 2600, len(first)),
                       values)
    run = SplitRun(tracks, (0, 3, 9))
    back = unpack_run(pack_run(run))
    assert back.window_starts == run.window_starts
    for name in ("first_frame", "num_track_frames", "length_mm", "width_mm", "values"):
        np.testing.assert_array_equal(getattr(back.tracks, name), getattr(tracks, name))


# --------------------------------------------------------------------------------------------------
# Lanelet2 maps
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("town", TOWN_NAMES)
def test_lanelet_map_routing(towns_root, manifest, town):
    from envs.data.towns.lanelet_map import load_lanelet_map

    lmap, graph = load_lanelet_map(towns_root / "maps" / f"DR_{town}.osm")
    lanelets = list(lmap.laneletLayer)
    assert len(lanelets) == manifest["maps"][town]["lanelets"]
    no_succ = [ll for ll in lanelets if not graph.following(ll)]
    assert len(no_succ) == manifest["maps"][town]["fringe_lanelets_without_successor"]
    assert manifest["maps"][town]["sumo_connections_missing_in_routing_graph"] == 0
    assert manifest["maps"][town]["centres_inside_lanelets"] >= 0.99
    through_junction = 0
    for ll in lanelets:
        internal = ll.attributes["sumo_lane_id"].startswith(":")
        if internal:  # junction lanes always lead somewhere and come from somewhere
            assert graph.following(ll), ll.attributes["sumo_lane_id"]
            assert graph.previous(ll), ll.attributes["sumo_lane_id"]
        else:
            # Reach a normal lane on the far side of the junction through internal lanes.
            frontier, seen = list(graph.following(ll)), set()
            while frontier:
                nxt = frontier.pop()
                if nxt.id in seen:
                    continue
                seen.add(nxt.id)
                if not nxt.attributes["sumo_lane_id"].startswith(":"):
                    through_junction += 1
                    break
                frontier.extend(graph.following(nxt))
        for bound in (ll.leftBound, ll.rightBound):
            assert not bound.inverted()
            xy = np.array([(p.x, p.y) for p in bound])
            assert np.hypot(*np.diff(xy, axis=0).T).max() <= 2.0 + 1e-6
    assert through_junction == sum(not ll.attributes["sumo_lane_id"].startswith(":") for ll in lanelets) - len(
        [ll for ll in no_succ if not ll.attributes["sumo_lane_id"].startswith(":")])
    if town == "USA_Town_Grid":  # two lanes each way: lane-change neighbours exist
        assert any(graph.left(ll) or graph.right(ll) for ll in lanelets)


@pytest.mark.parametrize("town", TOWN_NAMES)
def test_centres_inside_lanelets(towns_root, tables, town):
    from envs.data.towns.lanelet_map import fraction_inside, lanelet_polygons

    df = tables[(town, "val")]
    xy = df[["x", "y"]].to_numpy()[::5]
    assert fraction_inside(lanelet_polygons(towns_root / "maps" / f"DR_{town}.osm"), xy) >= 0.99


# --------------------------------------------------------------------------------------------------
# Regeneration with SUMO
# --------------------------------------------------------------------------------------------------


def _have_sumo() -> str | None:
    try:
        import sumo  # noqa: F401
        import sumolib  # noqa: F401
    except ImportError as exc:
        return f"SUMO not installed ({exc}); pip install -e '.[sumo]'"
    return None


@pytest.mark.sumo
@pytest.mark.slow
@pytest.mark.skipif(_have_sumo() is not None, reason=_have_sumo() or "")
def test_regeneration_is_byte_identical_to_committed_assets(tmp_path):
    manifest = generate_towns(tmp_path / "assets", seed=0, compress=True)
    committed = sorted(p.name for p in gen.ASSETS_DIR.iterdir())
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == committed
    for name in committed:
        assert (tmp_path / "assets" / name).read_bytes() == (gen.ASSETS_DIR / name).read_bytes(), name
    assert manifest == json.loads((gen.ASSETS_DIR / "towns.json").read_text())


@pytest.mark.sumo
@pytest.mark.slow
@pytest.mark.skipif(_have_sumo() is not None, reason=_have_sumo() or "")
def test_plain_generation_matches_committed_checksums(tmp_path):
    town = "USA_Town_Roundabout"
    manifest = generate_towns(tmp_path / "plain", seed=0, towns=[town], compress=False)
    committed = json.loads((gen.ASSETS_DIR / "towns.json").read_text())
    assert manifest["towns"] == [town]
    for rel, digest in manifest["files"].items():
        assert committed["files"][rel] == digest, rel
    assert verify_towns(tmp_path / "plain") == manifest


def test_crop_keeps_cases_identical():
    """Cropping a run to its windows (and renumbering frames) must not change any case's CSV text."""
    rng = np.random.default_rng(3)
    first = np.array([0, 5, 40, 120, 150, 260], dtype=np.int64)
    count = np.array([300, 100, 91, 100, 20, 40], dtype=np.int64)
    tracks = RunTracks(300, first, count, np.full(6, 4600), np.full(6, 1850),
                       rng.integers(-9999, 9999, size=(int(count.sum()), 5)))
    starts = [30, 60, 150]  # the first window (frame 0) is deliberately not used
    full = "".join(iter_csv_chunks(SplitRun(tracks, tuple(starts))))
    cropped = gen._crop(tracks, starts)
    assert cropped.window_starts == (0, 30, 120)
    assert cropped.tracks.num_tracks == 5  # the track starting at frame 260 lies outside every window
    assert "".join(iter_csv_chunks(cropped)) == full
