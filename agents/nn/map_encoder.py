"""The map encoder shared by the learned agents: map pieces (``agents.nn.map_pieces``) embedded from their
points and type, then ``layers`` blocks of relative-pose attention over each piece's nearest pieces within
``radius`` (``agents.nn.attention``). Its output, a ``MapEncoding``, is what agent decoders attend to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from agents.nn.attention import NeighbourAttention, RadiusGrid, RelPoseEncoding, flat_index, gather, knn, relative_pose
from agents.nn.map_pieces import PIECE_POINTS
from envs.types import PolylineType, TrafficLightState

PIECE_INPUT = 2 * PIECE_POINTS  # a piece's points (x, y in its own frame), flattened


@dataclass
class MapEncoding:
    """Encoded map pieces of ``U`` maps: features ``(U, M, D)``, pose ``(U, M, 3)``, valid ``(U, M)``.

    rows: ``(B,)`` the map of each batch row (None: row ``b`` uses map ``b``, as in training batches; rollouts
    encode each map of a batch once and point R copies of a scene at it). kv: per decoder layer, the map->agent
    keys/values ``(U * M, 2D)`` projected once (the map stays fixed during a rollout). grid: a ``RadiusGrid`` of
    the pieces for exact map->agent neighbour queries without a scan over every piece.
    """

    feat: torch.Tensor
    pose: torch.Tensor
    valid: torch.Tensor
    kv: list | None = None
    rows: torch.Tensor | None = None
    grid: RadiusGrid | None = None

    def row_maps(self, batch: int) -> torch.Tensor:
        """``(B,)`` index of each batch row's map."""
        if self.rows is not None:
            return self.rows
        if batch != self.feat.shape[0]:
            raise ValueError(f"{self.feat.shape[0]} encoded maps for a batch of {batch} rows and no row index.")
        return torch.arange(batch, device=self.feat.device)


class MapEncoder(nn.Module):
    """Map pieces -> features ``(U, M, dim)``. ``k`` neighbours per piece within ``radius`` (m)."""

    def __init__(self, dim: int, heads: int, layers: int, radius: float, k: int, dropout: float = 0.0):
        super().__init__()
        self.radius, self.k = radius, k
        self.piece_mlp = nn.Sequential(nn.Linear(PIECE_INPUT, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.piece_type = nn.Embedding(len(PolylineType), dim)
        self.piece_light = nn.Embedding(len(TrafficLightState), dim)
        self.map_rel = RelPoseEncoding(dim, radius)
        self.map_layers = nn.ModuleList(NeighbourAttention(dim, heads, dropout) for _ in range(layers))

    def forward(self, points: torch.Tensor, pose: torch.Tensor, kind: torch.Tensor, valid: torch.Tensor,
                light: torch.Tensor | None = None, nbr: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> MapEncoding:
        """points ``(U, M, P, 2)`` local, pose ``(U, M, 3)``, kind ``(U, M)`` ``PolylineType``, valid ``(U, M)`` of
        ``U`` maps; light: optional ``(U, M)`` ``TrafficLightState``; nbr: optional precomputed ``(U, M, K)``
        neighbour indices (-1: none), else found here; rows: optional ``(B,)`` map of each batch row
        (``MapEncoding.rows``)."""
        b, m = valid.shape
        x = self.piece_mlp(points.flatten(-2)) + self.piece_type(kind)
        if light is not None:
            x = x + self.piece_light(light)
        if m:
            if nbr is None:
                idx, ok = knn(pose[..., :2], pose[..., :2], self.k, self.radius, valid)  # (U, M, K)
            else:
                idx, ok = nbr.clamp(min=0), nbr >= 0
            ok = ok & valid[..., None]
            kp = gather(pose, idx)
            rel = self.map_rel(relative_pose(pose[:, :, None], kp)).flatten(0, 1)
            flat = flat_index(idx, m).flatten(0, 1)
            for layer in self.map_layers:
                x = layer(x.reshape(b * m, -1), x.reshape(b * m, -1), flat, rel, ok.flatten(0, 1)).view(b, m, -1)
        return MapEncoding(x, pose, valid, rows=rows)


GRID_CELL = 10.0  # m: cell of the rollouts' map->agent neighbour grid (``RadiusGrid``)


@torch.no_grad()
def encode_map_batch(encoder: MapEncoder, sources, encoded: dict, m2a_radius: float,
                     device=None) -> MapEncoding:
    """Every piece of each map of a rollout batch (``sources``: ``MapData`` objects, one per map index), encoded
    by ``encoder`` once per map id (``encoded``: the caller's cache, map id -> encoding, kept while the weights
    are fixed) and stacked ``(U, M, D)`` (padding invalid), with a ``RadiusGrid`` of the pieces for map->agent
    queries within ``m2a_radius``. The whole map, not a crop around the logged tracks: where the agents will
    drive is not known."""
    from agents.nn.attention import RadiusGrid
    from agents.nn.map_pieces import cached_map_pieces, map_piece_grid_table, map_piece_neighbours

    for m in sources:
        if m.map_id not in encoded:
            p = cached_map_pieces(m)
            nbr = map_piece_neighbours(m, encoder.k, encoder.radius)
            encoded[m.map_id] = encoder(
                torch.as_tensor(p["points"], device=device)[None], torch.as_tensor(p["pose"], device=device)[None],
                torch.as_tensor(p["type"], device=device)[None],
                torch.ones(1, len(p["pose"]), dtype=torch.bool, device=device),
                nbr=torch.as_tensor(nbr, device=device)[None])
    encs = [encoded[m.map_id] for m in sources]
    u, width, d = len(encs), max(e.feat.shape[1] for e in encs), encs[0].feat.shape[-1]
    feat = torch.zeros(u, width, d, device=device)
    pose = torch.zeros(u, width, 3, device=device)
    valid = torch.zeros(u, width, dtype=torch.bool, device=device)
    for i, e in enumerate(encs):
        n = e.feat.shape[1]
        feat[i, :n], pose[i, :n], valid[i, :n] = e.feat[0], e.pose[0], e.valid[0]
    grid = RadiusGrid.stack([map_piece_grid_table(m, m2a_radius, GRID_CELL) for m in sources], m2a_radius,
                            GRID_CELL, device)
    return MapEncoding(feat, pose, valid, grid=grid)
