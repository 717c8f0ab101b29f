"""The ``trafficgym data`` command on the hand-built INTERACTION fixture."""

from __future__ import annotations

import json

import pytest

from tests import interaction_fixture as fixture
from training.cli import main


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory):
    root = fixture.write_dataset(tmp_path_factory.mktemp("tiny"), cases=2, case_length=91)
    cache = tmp_path_factory.mktemp("cache")
    return ["--dataset", "interaction_multi", "--data-dir", str(root), "--case-length", "91", "--cache-dir", str(cache)]


def test_data_info_json_one_split(tiny_args, capsys):
    assert main(["data", "info", *tiny_args, "--split", "val", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["scenes"] == 2
    assert info["scene_length_s"] == 9.1
    assert info["mean_agents_per_scene"] == 3.0
    assert info["agents_per_type"]["pedestrian"] == 2


def test_data_info_table_all_splits(tiny_args, capsys):
    assert main(["data", "info", *tiny_args]) == 0
    out = capsys.readouterr().out
    assert "train" in out
    assert "val" in out
    assert "interaction_multi:USA_Tiny_Road" in out


def test_data_maps_writes_a_png(tiny_args, tmp_path, capsys):
    assert main(["data", "maps", *tiny_args, "--out", str(tmp_path)]) == 0
    png = tmp_path / "USA_Tiny_Road.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["data", "info", "--dataset", "nuscenes_mini"], "Did you mean"),
    (["data", "info", "--dataset", "nusc_mini", "--split", "mini_val"], "needs data_dir"),
    (["data", "info", "--dataset", "interaction_multi", "--data-dir", "/no/such/dir", "--split", "val"],
     "does not exist"),
])
def test_data_errors_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_compares_agents_and_writes_json(tiny_args, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--agent", "log_replay", "--agent", "constant_velocity", *tiny_args, "--split", "val",
                 "--rollouts", "2", "--metric", "min_ade", "--metric", "blm_safety", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["agent"] for r in rows] == ["log_replay", "constant_velocity"]
    assert rows[0]["scenes"] == 2
    assert rows[0]["metrics"]["min_ade"] == 0.0
    assert rows[0]["metrics"]["blm_collision_rate"] == 0.0
    assert rows[1]["metrics"]["min_ade"] > 0.0
    assert len(rows[1]["per_scene"]) == 2
    printed = capsys.readouterr().out
    assert "log_replay" in printed
    assert "blm_offroad_rate" in printed
    assert main(["eval", "--agent", "log_replya", *tiny_args]) == 2
    assert "Did you mean 'log_replay'" in capsys.readouterr().err
    assert main(["eval", "--agent", "idm", *tiny_args, "--metric", "realsim"]) == 2
    assert "Did you mean 'realism'" in capsys.readouterr().err


def test_render_writes_a_closed_loop_video(tiny_args, tmp_path, capsys):
    import imageio.v3 as iio

    out = tmp_path / "idm.gif"
    assert main(["render", "--agent", "idm", *tiny_args, "--split", "val", "--scene", "DR_USA_Tiny_Road_val_0",
                 "--out", str(out), "--size", "128", "--side-by-side"]) == 0
    frames = iio.imread(out, index=None)
    assert frames.shape[0] == 81  # 80 steps + the start
    assert frames.shape[2] == 2 * 128 + 4  # log | sim, side by side
    assert main(["render", "--agent", "idm", *tiny_args, "--scene", "DR_USA_Tiny_Road_val_0",
                 "--out", str(tmp_path / "x.avi")]) == 2
    assert "extension" in capsys.readouterr().err
    assert main(["render", "--agent", "idm", *tiny_args, "--scene", "DR_USA_Tiny_Road_val_7",
                 "--out", str(tmp_path / "x.gif")]) == 2
    assert "Did you mean" in capsys.readouterr().err


def test_eval_agent_args_and_traffic_checkpoint(tiny_args, tmp_path, capsys):
    common = ["eval", *tiny_args, "--split", "val", "--rollouts", "2", "--metric", "min_ade"]
    out = tmp_path / "idm.json"
    assert main([*common, "--agent", "idm", "--agent-arg", "time_headway=0.6", "--agent-arg", "max_accel=3",
                 "--json", str(out)]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["metrics"]["min_ade"] >= 0
    for argv, message in (
            (["--agent", "idm", "--agent-arg", "time_headway"], "expects KEY=VALUE"),
            (["--agent", "idm", "--agent-arg", "time_headwya=1.0"], "Did you mean 'time_headway'"),
            (["--agent", "idm", "--agent", "constant_velocity", "--agent-arg", "time_headway=1.0"],
             "evaluate one agent at a time"),
            (["--agent", "constant_velocity", "--setting", "ego", "--traffic", "idm", "--traffic-checkpoint",
              str(out)], "has no weights")):
        assert main([*common, *argv]) == 2
        assert message in capsys.readouterr().err
