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
