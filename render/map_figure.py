"""Static matplotlib pictures of a map with one scene's agents: for docs and quick looks.

The animated, fast renderer (pygame) lives in ``render/renderer.py``; this one trades speed for print quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from envs.geometry import box_corners
from envs.types import AgentType, MapData, PolylineType, Scene

TYPE_COLORS = {AgentType.VEHICLE: "#3b78c2", AgentType.PEDESTRIAN: "#e08a1e", AgentType.CYCLIST: "#3aa35c",
               AgentType.OTHER: "#888888"}
EGO_COLOR = "#d62728"


def draw_map(ax, m: MapData) -> None:
    """Drivable area (filled from the road-edge rings), lane boundaries and lane centres on ``ax``."""
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath

    rings = m.polylines_of(PolylineType.ROAD_EDGE)
    if rings:
        # Exteriors run counter-clockwise and holes clockwise, so the non-zero winding rule cuts the holes out.
        verts = np.concatenate(rings)
        codes = np.concatenate([[MplPath.MOVETO] + [MplPath.LINETO] * (len(r) - 1) for r in rings])
        ax.add_patch(PathPatch(MplPath(verts, codes), facecolor="#d9d9d9", edgecolor="#333333", lw=0.8, zorder=1))
    for line in m.polylines_of(PolylineType.LANE_BOUNDARY):
        ax.plot(line[:, 0], line[:, 1], color="white", lw=0.5, zorder=2)
    for line in m.polylines_of(PolylineType.LANE_CENTER):
        ax.plot(line[:, 0], line[:, 1], color="#a0a0a0", lw=0.4, ls=(0, (2, 3)), zorder=2)
    for kind in (PolylineType.CROSSWALK, PolylineType.WALKWAY):
        for ring in m.polylines_of(kind):
            ax.fill(ring[:, 0], ring[:, 1], color="#f2f2f2", ec="#777777", lw=0.4, zorder=2)


def draw_agents(ax, scene: Scene, step: int) -> None:
    """Agents valid at ``step`` as oriented boxes coloured by type (ego in red)."""
    from matplotlib.patches import Polygon as MplPolygon

    live = np.flatnonzero(scene.valid[:, step])
    state = scene.trajectory[live, step]
    corners = box_corners(state[:, 0], state[:, 1], state[:, 2], scene.extent[live, 0], scene.extent[live, 1])
    for i, box in zip(live, corners, strict=True):
        color = EGO_COLOR if i == scene.ego_index else TYPE_COLORS[AgentType(int(scene.agent_type[i]))]
        ax.add_patch(MplPolygon(box, closed=True, facecolor=color, edgecolor="black", lw=0.3, zorder=3))


def save_map_figure(path: str | Path, m: MapData, scene: Scene | None = None, step: int = 10,
                    title: str | None = None, size_in: float = 4.5, dpi: int = 90) -> Path:
    """Write a PNG of ``m`` (and ``scene``'s agents at ``step``) to ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size_in, size_in), dpi=dpi)
    draw_map(ax, m)
    if scene is not None:
        draw_agents(ax, scene, step)
    x0, y0, x1, y1 = m.extent
    pad = 0.03 * max(x1 - x0, y1 - y0)
    ax.set_xlim(x0 - pad, x1 + pad)
    ax.set_ylim(y0 - pad, y1 + pad)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or m.map_id, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
