"""Building blocks of the learned agents: relative-pose attention over gathered neighbours.

Every attention in the tokenized policy (map↔map, map→agent, agent↔agent, temporal) has the same form: each
query attends to ``K`` gathered keys (its neighbours: nearest within a radius, or its previous steps), and the
keys and values carry an encoding of the key's pose *relative to the query's* (distance, bearing, relative
heading, time offset). Relative encodings make the model invariant to where a scene lies in the world.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from envs.geometry import pose_in_frame


def fourier(x: torch.Tensor, freqs: int, scale: float) -> torch.Tensor:
    """``(..., 2 * freqs)`` sin/cos features of ``x / scale`` at frequencies 1, 2, 4, ... (plus nothing else)."""
    f = (2.0 ** torch.arange(freqs, device=x.device, dtype=x.dtype)) * (math.pi / scale)
    a = x[..., None] * f
    return torch.cat([a.sin(), a.cos()], dim=-1)


def relative_pose(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Pose of ``key`` ``(..., 3)`` in the frame of ``query`` ``(..., 3)``: ``(..., 3)`` x, y, relative heading
    (not wrapped: the encodings take its cos and sin)."""
    return pose_in_frame(key, query, wrap=False)


class RelPoseEncoding(nn.Module):
    """MLP of (Fourier features of distance, bearing cos/sin, relative heading cos/sin, time offset)."""

    def __init__(self, dim: int, radius: float, freqs: int = 6):
        super().__init__()
        self.radius, self.freqs = radius, freqs
        self.mlp = nn.Sequential(nn.Linear(2 * freqs + 5, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, rel: torch.Tensor, dt: torch.Tensor | None = None) -> torch.Tensor:
        dist = rel[..., :2].norm(dim=-1)
        bearing = torch.atan2(rel[..., 1], rel[..., 0])
        dt = torch.zeros_like(dist) if dt is None else dt.expand_as(dist)
        feats = torch.cat([fourier(dist, self.freqs, 2 * self.radius), bearing.cos()[..., None],
                           bearing.sin()[..., None], rel[..., 2].cos()[..., None], rel[..., 2].sin()[..., None],
                           dt[..., None]], dim=-1)
        return self.mlp(feats)


class NeighbourAttention(nn.Module):
    """Pre-norm transformer block: each of ``N`` queries attends to ``K`` keys gathered from a source set, with
    relative-pose encodings added to keys and values, then a feed-forward layer. Keys and values are projected
    on the source set *before* gathering (each source row is shared by many queries)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm_q, self.norm_k, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.rel_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def project(self, source: torch.Tensor) -> torch.Tensor:
        """Keys and values ``(M, 2D)`` of source rows (cacheable when the source does not change, e.g. the map)."""
        return self.kv(self.norm_k(source))

    def forward(self, x: torch.Tensor, source: torch.Tensor | None, idx: torch.Tensor, rel: torch.Tensor,
                mask: torch.Tensor, source_kv: torch.Tensor | None = None) -> torch.Tensor:
        """x ``(N, D)`` queries; source ``(M, D)`` key rows (or their ``project``ion ``source_kv``); idx ``(N, K)``
        rows each query attends to; rel ``(N, K, D)`` relative-pose encodings; mask ``(N, K)`` bool (True =
        attend). Queries without any key get no attention update (only the feed-forward)."""
        n, k = idx.shape
        d, h = x.shape[-1], self.heads
        q = self.q(self.norm_q(x)).view(n, 1, h, d // h)
        flat = idx.reshape(-1)
        if source_kv is not None:
            kv = source_kv[flat]
        elif flat.numel() < source.shape[0]:  # few queries (a rollout step): project only the rows gathered
            kv = self.project(source[flat])
        else:  # many queries share each row (training): project every row once, then gather
            kv = self.project(source)[flat]
        kv = kv.view(n, k, 2 * d) + self.rel_kv(rel)
        key, val = kv[..., :d].reshape(n, k, h, d // h), kv[..., d:].reshape(n, k, h, d // h)
        logits = (q * key).sum(-1) / math.sqrt(d // h)  # (N, K, H)
        logits = logits.masked_fill(~mask[..., None], float("-inf"))
        any_key = mask.any(dim=-1)
        weights = torch.softmax(torch.where(any_key[:, None, None], logits, torch.zeros_like(logits)), dim=1)
        att = (weights[..., None] * val).sum(1).reshape(n, d)
        x = x + self.drop(self.out(att)) * any_key[:, None]
        return x + self.drop(self.ff(self.norm_ff(x)))


def knn(query_xy: torch.Tensor, key_xy: torch.Tensor, k: int, radius: float, key_valid: torch.Tensor,
        exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(..., Q, k)`` of the ``k`` nearest valid keys within ``radius`` of each query (batched over
    leading dims) and the mask of those that exist. query_xy ``(..., Q, 2)``, key_xy ``(..., M, 2)``,
    key_valid ``(..., M)``."""
    m = key_xy.shape[-2]
    if m == 0:
        shape = (*query_xy.shape[:-1], 0)
        return (torch.zeros(shape, dtype=torch.long, device=query_xy.device),
                torch.zeros(shape, dtype=torch.bool, device=query_xy.device))
    d2 = (query_xy[..., :, None, :] - key_xy[..., None, :, :]).square().sum(-1)  # (..., Q, M)
    d2 = d2.masked_fill(~key_valid[..., None, :], float("inf"))
    if exclude_self:
        eye = torch.eye(query_xy.shape[-2], m, dtype=torch.bool, device=d2.device)
        d2 = d2.masked_fill(eye, float("inf"))
    k = min(k, m)
    dist, idx = d2.topk(k, dim=-1, largest=False)
    return idx, dist <= radius * radius


def radius_neighbours(points: np.ndarray, tree, count: int, k: int, radius: float) -> np.ndarray:
    """``(len(points), k)`` indices of the ``k`` nearest of the ``count`` points of a ``scipy.spatial.cKDTree``
    within ``radius`` (-1: none), nearest first: what ``knn`` finds, on the CPU, for fixed point sets."""
    if count == 0 or len(points) == 0:
        return np.full((len(points), k), -1, np.int64)
    _, idx = tree.query(points, k=min(k, count), distance_upper_bound=radius)
    idx = np.asarray(idx).reshape(len(points), -1)
    idx = np.where(idx >= count, -1, idx)
    return np.pad(idx, ((0, 0), (0, k - idx.shape[1])), constant_values=-1).astype(np.int64)


class RadiusGrid:
    """Exact ``knn`` against fixed point sets (a batch's maps) without comparing every query with every point.

    The plane around each set is cut into square cells of ``cell`` metres; each cell lists every point within
    ``radius`` + half the cell diagonal of its centre, so a query's candidates (its cell's list) contain every
    point within ``radius`` of it. A query outside the grid (which extends ``radius`` beyond the points) has no
    point within ``radius`` and is clamped to a border cell, whose candidates then fail the radius test.

    cells ``(U, G, C)`` point indices per set and cell (-1: padding), origin ``(U, 2)`` m, dims ``(U, 2)`` cells
    along x and y.
    """

    def __init__(self, cells: torch.Tensor, origin: torch.Tensor, dims: torch.Tensor, cell: float, radius: float):
        self.cells, self.origin, self.dims, self.cell, self.radius = cells, origin, dims, cell, radius

    @staticmethod
    def table(points: np.ndarray, radius: float, cell: float = 10.0, tree=None) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray]:
        """One point set's part of a grid: ``(G, C)`` point indices per cell (-1: padding; cells x-major), the
        grid's origin ``(2,)`` and its cells along x and y ``(2,)``. ``tree``: the points' ``cKDTree`` if one
        exists already."""
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        low = pts.min(axis=0) - radius if len(pts) else np.zeros(2)
        high = pts.max(axis=0) + radius if len(pts) else np.zeros(2)
        n = np.maximum(np.ceil((high - low) / cell).astype(np.int64), 1)
        ix, iy = np.meshgrid(np.arange(n[0]), np.arange(n[1]), indexing="ij")
        centres = low + (np.stack([ix.ravel(), iy.ravel()], -1) + 0.5) * cell
        if len(pts):
            if tree is None:
                from scipy.spatial import cKDTree

                tree = cKDTree(pts)
            lists = tree.query_ball_point(centres, radius + cell * math.sqrt(0.5))
        else:
            lists = [[] for _ in centres]
        cells = np.full((len(lists), max([len(x) for x in lists] + [1])), -1, np.int64)
        for j, x in enumerate(lists):
            cells[j, :len(x)] = x
        return cells, low, n

    @classmethod
    def build(cls, point_sets: list[np.ndarray], radius: float, cell: float = 10.0, device=None) -> RadiusGrid:
        """One grid per ``(M_u, 2)`` point set (m)."""
        return cls.stack([cls.table(pts, radius, cell) for pts in point_sets], radius, cell, device)

    @classmethod
    def stack(cls, tables: list[tuple], radius: float, cell: float, device=None) -> RadiusGrid:
        """The grid of point sets whose ``table`` (same ``radius`` and ``cell``) is already known."""
        g, c = max(t[0].shape[0] for t in tables), max(t[0].shape[1] for t in tables)
        cells = np.full((len(tables), g, c), -1, np.int64)
        for u, (t, _, _) in enumerate(tables):
            cells[u, :t.shape[0], :t.shape[1]] = t
        return cls(torch.as_tensor(cells, device=device),
                   torch.as_tensor(np.stack([t[1] for t in tables]), dtype=torch.float32, device=device),
                   torch.as_tensor(np.stack([t[2] for t in tables]), device=device), cell, radius)

    def knn(self, query_xy: torch.Tensor, sets: torch.Tensor, key_xy: torch.Tensor, k: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``knn`` of queries ``(B, Q, 2)`` against point set ``sets[b]`` ``(B,)`` of ``key_xy`` ``(U, M, 2)``
        within the grid's radius: indices ``(B, Q, k)`` into the set and the mask of those that exist."""
        dims = self.dims[sets][:, None]  # (B, 1, 2)
        ij = ((query_xy - self.origin[sets][:, None]) / self.cell).floor().long()
        ij = torch.minimum(ij.clamp(min=0), dims - 1)
        cand = self.cells[sets[:, None], ij[..., 0] * dims[..., 1] + ij[..., 1]]  # (B, Q, C)
        pts = key_xy[sets[:, None, None], cand.clamp(min=0)]  # (B, Q, C, 2)
        d2 = (pts - query_xy[..., None, :]).square().sum(-1).masked_fill(cand < 0, float("inf"))
        want = min(k, key_xy.shape[1])  # as many columns as knn returns
        if cand.shape[-1] < want:
            d2 = torch.nn.functional.pad(d2, (0, want - cand.shape[-1]), value=float("inf"))
            cand = torch.nn.functional.pad(cand, (0, want - cand.shape[-1]), value=-1)
        dist, j = d2.topk(want, dim=-1, largest=False)
        return cand.gather(-1, j).clamp(min=0), dist <= self.radius * self.radius


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, ..., M, F...)`` gathered along its second-to-feature axis by ``idx`` ``(B, ..., Q, K)``:
    ``(B, ..., Q, K, F...)``. Leading dims of ``x`` (all but the gathered one) must match ``idx``'s."""
    lead = idx.shape[:-2]
    q, k = idx.shape[-2:]
    m = x.shape[len(lead)]
    feat = x.shape[len(lead) + 1:]
    flat = x.reshape(-1, m, *feat)
    base = (torch.arange(flat.shape[0], device=x.device) * m).view(-1, 1, 1)
    out = flat.reshape(-1, *feat)[(base + idx.reshape(-1, q, k)).reshape(-1)]
    return out.view(*lead, q, k, *feat)


def flat_index(idx: torch.Tensor, m: int) -> torch.Tensor:
    """Row indices ``idx`` ``(G, Q, K)`` into groups of ``m`` rows -> indices into the ``G * m`` stacked rows."""
    return idx + (torch.arange(idx.shape[0], device=idx.device) * m).view(-1, *([1] * (idx.dim() - 1)))
