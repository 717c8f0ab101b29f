"""A hand-built dataset in the INTERACTION prediction-challenge layout, for tests of the trajdata pipeline.

Map ``DR_USA_Tiny_Road``: two same-direction lanes side by side (3.5 m wide, along +x from x = 0 to 100 m,
lane 0 centred on y = 0, lane 1 on y = 3.5) sharing their middle boundary, and a lane continuing lane 0 from
x = 100 to 150 m. With ``sparse=True`` every bound has only its two end points (to exercise densification).

Tracks: ``cases`` cases of ``case_length`` frames at 10 Hz. In every case, track 1 drives lane 0 at
``10 + case`` m/s from x = 5 for the whole case; track 2 drives lane 1 at 5 m/s and is present only in
frames 1..50 (leaves early); track 3 (a pedestrian/bicycle) walks along y = -3 for frames 11..case_length.
"""

from __future__ import annotations

from pathlib import Path

import lanelet2
import numpy as np
from lanelet2.core import Lanelet, LineString3d, Point3d, getId
from lanelet2.projection import UtmProjector

COLUMNS = "case_id,track_id,frame_id,timestamp_ms,agent_type,x,y,vx,vy,psi_rad,length,width"
LOCATION = "USA_Tiny_Road"
LANE_WIDTH = 3.5


def _line(points: list[Point3d], subtype: str) -> LineString3d:
    return LineString3d(getId(), points, {"type": "line_thin", "subtype": subtype})


def _pts(xs: np.ndarray, y: float) -> list[Point3d]:
    return [Point3d(getId(), float(x), float(y), 0.0) for x in xs]


def write_map(path: Path, sparse: bool = False) -> None:
    """Write the Lanelet2 map of the module docstring to ``path``."""
    step = 100.0 if sparse else 2.0
    xs = np.arange(0.0, 100.0 + 1e-9, step)
    half = LANE_WIDTH / 2
    right0 = _line(_pts(xs, -half), "solid")
    middle = _line(_pts(xs, half), "dashed")  # shared by lane 0 (left) and lane 1 (right)
    left1 = _line(_pts(xs, half + LANE_WIDTH), "solid")
    lane0 = Lanelet(getId(), middle, right0, {"subtype": "road", "one_way": "yes"})
    lane1 = Lanelet(getId(), left1, middle, {"subtype": "road", "one_way": "yes"})
    xs2 = np.arange(100.0, 150.0 + 1e-9, 50.0 if sparse else 2.0)
    # The continuation shares the end points of lane 0's bounds, so lanelet2 routes lane 0 -> lane 2.
    left2 = _line([middle[-1]] + _pts(xs2[1:], half), "solid")
    right2 = _line([right0[-1]] + _pts(xs2[1:], -half), "solid")
    lane2 = Lanelet(getId(), left2, right2, {"subtype": "road", "one_way": "yes"})
    lmap = lanelet2.core.LaneletMap()
    for lane in (lane0, lane1, lane2):
        lmap.add(lane)
    lanelet2.io.write(str(path), lmap, UtmProjector(lanelet2.io.Origin(0.0, 0.0)))


def track_rows(cases: int, case_length: int) -> list[str]:
    """CSV rows (without header) of the module docstring's tracks, ordered by case, track, frame."""
    rows = []
    for case in range(1, cases + 1):
        frames = np.arange(1, case_length + 1)
        t = (frames - 1) * 0.1
        speed = 10.0 + case
        tracks = [
            (1, "car", frames, 5.0 + speed * t, 0.0 * t, speed, 0.0, 4.5, 1.8),
            (2, "car", frames[:50], 20.0 + 5.0 * t[:50], 0.0 * t[:50] + LANE_WIDTH, 5.0, 0.0, 5.0, 2.0),
            (3, "pedestrian/bicycle", frames[10:], 1.0 + 1.2 * t[10:], 0.0 * t[10:] - 3.0, 1.2, 0.0, 0.5, 0.5),
        ]
        for track_id, label, fr, x, y, vx, vy, length, width in tracks:
            for f, xi, yi in zip(fr, x, y, strict=True):
                rows.append(f"{case},{track_id},{f},{f * 100},{label},{xi:.3f},{yi:.3f},{vx:.3f},{vy:.3f},"
                            f"0.000,{length:.3f},{width:.3f}")
    return rows


def write_dataset(root: Path, cases: int = 2, case_length: int = 91, sparse: bool = False,
                  splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Write the whole fixture dataset under ``root`` and return ``root``."""
    (root / "maps").mkdir(parents=True, exist_ok=True)
    write_map(root / "maps" / f"DR_{LOCATION}.osm", sparse=sparse)
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        lines = [COLUMNS, *track_rows(cases, case_length)]
        (root / split / f"DR_{LOCATION}_{split}.csv").write_text("\n".join(lines) + "\n")
    return root
