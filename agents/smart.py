"""SMART-style tokenized sim-agent policy: a map encoder and an autoregressive agent decoder over 0.5 s motion
tokens (Wu et al., SMART, arXiv 2405.15677; Zhang et al., CAT-K, arXiv 2412.05334), reimplemented in our own
code.

Inputs per scene. Map: 5 m polyline pieces (``tokenizer.map_pieces``: local points, pose, type). Agents: at each
0.5 s step ``s``, the pose at the step boundary, the token that led into it (``BOS`` at the first step), the
agent's type and box size. The model predicts the token of the next 0.5 s.

Network. Map encoder: ``map_layers`` blocks of self-attention over each piece's nearest pieces within
``map_radius``. Agent decoder: ``agent_layers`` blocks of (temporal attention over the agent's own previous
``TEMPORAL_WINDOW`` steps; map→agent attention over the nearest pieces within ``m2a_radius``; agent↔agent
attention over the nearest agents at the same step within ``a2a_radius``). All attention uses relative pose
encodings (``agents/layers.py``). Head: one linear layer per agent type onto that type's vocabulary.

Teacher forcing (``forward``) runs all steps at once with causal temporal attention; ``step`` runs one new step
from a cache of every layer's inputs for the previous steps, and gives the same logits (tested), so a
closed-loop rollout costs one incremental step per 0.5 s, not a re-encoding of the history.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from agents.layers import NeighbourAttention, RadiusGrid, RelPoseEncoding, knn, relative_pose
from agents.tokenizer import PIECE_POINTS, TYPE_NAMES, MotionVocabulary
from envs.types import AgentType, PolylineType, TrafficLightState

TOKEN_SECONDS = 0.5
# Weights that ship with the package, by name: ``make_agent("smart", checkpoint="towns-nano")``. Each was made by
# the command in the README's training section (the file's metadata holds its training config).
PRETRAINED = {"towns-nano": Path(__file__).with_name("weights") / "smart_nano_towns.safetensors"}
TEMPORAL_WINDOW = 6  # steps of history each step attends to (itself included)
MAP_GRID_CELL = 10.0  # m: cell of the rollout's map->agent neighbour grid (``RadiusGrid``)

SIZES = {
    # hidden, heads, map layers, agent layers, radii map / map->agent / agent<->agent (m): the SMART / CAT-K sizes;
    # k_*: neighbours gathered per query (the pair projections of the map encoder dominate the cost: nano
    # halves them, measured 2.5 -> 1.3 s per 4-scene training step on the 2-core VM)
    "nano": dict(hidden=64, heads=4, map_layers=2, agent_layers=4, map_radius=10.0, m2a_radius=20.0,
                 a2a_radius=20.0, k_map=8, k_m2a=16, k_a2a=8),
    "mini": dict(hidden=128, heads=4, map_layers=2, agent_layers=4, map_radius=10.0, m2a_radius=30.0,
                 a2a_radius=60.0, k_map=16, k_m2a=32, k_a2a=16),
    "tiny": dict(hidden=128, heads=8, map_layers=3, agent_layers=6, map_radius=10.0, m2a_radius=30.0,
                 a2a_radius=60.0, k_map=16, k_m2a=32, k_a2a=16),
}


@dataclass(frozen=True)
class SmartConfig:
    """Model configuration; ``vocab_sizes``: tokens per agent-type name (from the vocabulary)."""

    size: str
    hidden: int
    heads: int
    map_layers: int
    agent_layers: int
    map_radius: float
    m2a_radius: float
    a2a_radius: float
    k_map: int
    k_m2a: int
    k_a2a: int
    vocab_sizes: dict
    dropout: float = 0.1

    @classmethod
    def of_size(cls, size: str, vocab_sizes: dict, **overrides) -> SmartConfig:
        if size not in SIZES:
            from envs.errors import UnknownNameError

            raise UnknownNameError("SMART size", size, SIZES)
        return cls(size=size, vocab_sizes=dict(vocab_sizes), **{**SIZES[size], **overrides})

    def to_json(self) -> dict:
        return asdict(self)


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


@dataclass(frozen=True)
class TokenBatch:
    """A padded behaviour-cloning batch of ``B`` scenes (``training.bc_data.collate`` builds it): ``A`` agents
    (padding invalid), ``S`` step boundaries, the pieces of ``U`` maps (``M`` each, padded) shared by the scenes on
    the same map."""

    pose: torch.Tensor  # (B, A, S, 3) float: matched pose at each input boundary
    valid: torch.Tensor  # (B, A, S) bool
    in_token: torch.Tensor  # (B, A, S) long: the token that led into the boundary (-1: BOS)
    target: torch.Tensor  # (B, A, S) long: the next token (-1: none, masked out of the loss)
    agent_type: torch.Tensor  # (B, A) long: AgentType
    extent: torch.Tensor  # (B, A, 2) float: length, width (m)
    map_pose: torch.Tensor  # (U, M, 3) float
    map_points: torch.Tensor  # (U, M, PIECE_POINTS, 2) float
    map_type: torch.Tensor  # (U, M) long: PolylineType
    map_valid: torch.Tensor  # (U, M) bool
    map_nbr: torch.Tensor | None = None  # (U, M, k_map) long: each piece's map neighbours (-1: none)
    map_rows: torch.Tensor | None = None  # (B,) long: the map of each scene (None: scene b uses map b)
    m2a_nbr: torch.Tensor | None = None  # (B, A, S, k_m2a) long: the pieces each agent-step attends to (-1: none)

    def to(self, device: torch.device | str) -> TokenBatch:
        """The batch with every tensor on ``device``."""
        return replace(self, **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in fields(self)})

    @property
    def num_targets(self) -> int:
        """Valid next-token targets in the batch."""
        return int(((self.target >= 0) & self.valid).sum())


LABEL_SMOOTHING = 0.1  # of the behaviour-cloning cross-entropy (SMART)


class SmartModel(nn.Module):
    def __init__(self, cfg: SmartConfig, vocab: MotionVocabulary):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.types = [name for name in TYPE_NAMES.values() if name in cfg.vocab_sizes]
        for name in self.types:
            poses = vocab.poses[name].float()
            if len(poses) != cfg.vocab_sizes[name]:
                from envs.errors import VocabularyError

                raise VocabularyError(f"The {name} vocabulary has {len(poses)} tokens but the config says "
                                      f"{cfg.vocab_sizes[name]}.")
            self.register_buffer(f"vocab_{name}", poses)
        self.tol = vocab.tol
        # map
        self.piece_mlp = nn.Sequential(nn.Linear(2 * PIECE_POINTS, d), nn.ReLU(), nn.Linear(d, d))
        self.piece_type = nn.Embedding(len(PolylineType), d)
        self.piece_light = nn.Embedding(len(TrafficLightState), d)
        self.map_rel = RelPoseEncoding(d, cfg.map_radius)
        self.map_layers = nn.ModuleList(NeighbourAttention(d, cfg.heads, cfg.dropout) for _ in range(cfg.map_layers))
        # agents
        self.token_mlp = nn.Sequential(nn.Linear(18, d), nn.ReLU(), nn.Linear(d, d))
        self.bos = nn.Parameter(torch.zeros(d))
        self.agent_type = nn.Embedding(len(AgentType), d)
        self.size_mlp = nn.Sequential(nn.Linear(2, d), nn.ReLU(), nn.Linear(d, d))
        self.t_rel = RelPoseEncoding(d, 30.0)
        self.m2a_rel = RelPoseEncoding(d, cfg.m2a_radius)
        self.a2a_rel = RelPoseEncoding(d, cfg.a2a_radius)
        n = cfg.agent_layers
        self.temporal = nn.ModuleList(NeighbourAttention(d, cfg.heads, cfg.dropout) for _ in range(n))
        self.m2a = nn.ModuleList(NeighbourAttention(d, cfg.heads, cfg.dropout) for _ in range(n))
        self.a2a = nn.ModuleList(NeighbourAttention(d, cfg.heads, cfg.dropout) for _ in range(n))
        self.head_norm = nn.LayerNorm(d)
        self.heads = nn.ModuleDict({name: nn.Linear(d, cfg.vocab_sizes[name]) for name in self.types})

    def vocab(self, name: str) -> torch.Tensor:
        return getattr(self, f"vocab_{name}")

    # ---- map -------------------------------------------------------------------------------------------------
    def encode_map(self, points: torch.Tensor, pose: torch.Tensor, kind: torch.Tensor, valid: torch.Tensor,
                   light: torch.Tensor | None = None, nbr: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> MapEncoding:
        """points ``(U, M, P, 2)`` local, pose ``(U, M, 3)``, kind ``(U, M)`` ``PolylineType``, valid ``(U, M)`` of
        ``U`` maps; nbr: optional precomputed ``(U, M, K)`` neighbour indices (-1: none), else found here; rows:
        optional ``(B,)`` map of each batch row (``MapEncoding.rows``)."""
        b, m = valid.shape
        x = self.piece_mlp(points.flatten(-2)) + self.piece_type(kind)
        if light is not None:
            x = x + self.piece_light(light)
        if m:
            if nbr is None:
                idx, ok = knn(pose[..., :2], pose[..., :2], self.cfg.k_map, self.cfg.map_radius, valid)  # (B, M, K)
            else:
                idx, ok = nbr.clamp(min=0), nbr >= 0
            ok = ok & valid[..., None]
            kp = _gather(pose, idx)
            rel = self.map_rel(relative_pose(pose[:, :, None], kp)).flatten(0, 1)
            flat = _flat(idx, m).flatten(0, 1)
            for layer in self.map_layers:
                x = layer(x.reshape(b * m, -1), x.reshape(b * m, -1), flat, rel, ok.flatten(0, 1)).view(b, m, -1)
        return MapEncoding(x, pose, valid, rows=rows)

    # ---- agents ----------------------------------------------------------------------------------------------
    def embed_agents(self, in_token: torch.Tensor, agent_type: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
        """in_token ``(B, A, S)`` (-1: BOS), agent_type ``(B, A)``, extent ``(B, A, 2)`` -> ``(B, A, S, D)``."""
        emb = self.bos.expand(*in_token.shape, -1).clone()
        for name in self.types:
            kind = _type_of(name)
            sel = (agent_type[..., None] == kind) & (in_token >= 0)
            if sel.any():
                shapes = self.vocab(name)[in_token[sel]].flatten(-2)  # (n, 18)
                emb[sel] = self.token_mlp(shapes)
        static = self.agent_type(agent_type) + self.size_mlp(extent)
        return emb + static[:, :, None]

    def _layer(self, i: int, x, source_t, idx_t, rel_t, mask_t, map_enc, m_idx, m_rel, m_ok, a_idx, a_rel, a_ok):
        """One decoder layer on queries ``x`` ``(B, A, S', D)`` (S' = steps being computed); temporal keys are
        rows ``idx_t`` ``(B*A*S', W)`` of ``source_t``."""
        b, a, s, d = x.shape
        x = self.temporal[i](x.reshape(-1, d), source_t, idx_t, rel_t.reshape(-1, rel_t.shape[-2], d),
                             mask_t.reshape(-1, mask_t.shape[-1])).view(b, a, s, d)
        m = map_enc.feat.shape[1]
        map_kv = map_enc.kv[i] if map_enc.kv is not None else None
        m_rows = m_idx.flatten(1, 2) + (map_enc.row_maps(b) * m).view(b, 1, 1)  # rows of the (U * M) pieces
        n, k = b * a * s, m_idx.shape[-1]  # explicit sizes: a map without pieces has k = 0
        x = self.m2a[i](x.reshape(n, d), map_enc.feat.reshape(-1, d), m_rows.reshape(n, k), m_rel.reshape(n, k, d),
                        m_ok.reshape(n, k), source_kv=map_kv).view(b, a, s, d)
        xs = x.transpose(1, 2).reshape(b * s * a, d)  # agents of the same step together
        x = self.a2a[i](xs, xs, _flat(a_idx.reshape(b * s, a, -1), a).reshape(b * s * a, -1),
                        a_rel.reshape(-1, a_rel.shape[-2], d), a_ok.reshape(-1, a_ok.shape[-1]))
        return x.view(b, s, a, d).transpose(1, 2)

    def _spatial(self, pose: torch.Tensor, valid: torch.Tensor, map_enc: MapEncoding, m2a_nbr=None):
        """Map and agent neighbours of agent-steps: pose ``(B, A, S', 3)``, valid ``(B, A, S')``; m2a_nbr:
        optional precomputed ``(B, A, S', K)`` map neighbours (-1: none)."""
        b, a, s, _ = pose.shape
        q = pose.reshape(b, a * s, 3)
        maps = map_enc.row_maps(b)
        if m2a_nbr is not None:
            m_idx, m_ok = m2a_nbr.reshape(b, a * s, -1).clamp(min=0), m2a_nbr.reshape(b, a * s, -1) >= 0
        elif map_enc.grid is not None and map_enc.pose.shape[1] > 0:
            m_idx, m_ok = map_enc.grid.knn(q[..., :2], maps, map_enc.pose[..., :2], self.cfg.k_m2a)
        else:
            m_idx, m_ok = knn(q[..., :2], map_enc.pose[maps, :, :2], self.cfg.k_m2a, self.cfg.m2a_radius,
                              map_enc.valid[maps])
        m_ok = m_ok & map_enc.valid[maps[:, None, None], m_idx]
        m_rel = self.m2a_rel(relative_pose(q[:, :, None], map_enc.pose[maps[:, None, None], m_idx]))
        m_ok = m_ok & valid.reshape(b, a * s, 1)
        ps, vs = pose.transpose(1, 2), valid.transpose(1, 2)  # (B, S', A, ...)
        a_idx, a_ok = knn(ps[..., :2], ps[..., :2], self.cfg.k_a2a, self.cfg.a2a_radius, vs, exclude_self=True)
        a_rel = self.a2a_rel(relative_pose(ps[..., None, :], _gather(ps, a_idx)))
        a_ok = a_ok & vs[..., None]
        return (m_idx.view(b, a, s, -1), m_rel.view(b, a, s, *m_rel.shape[-2:]), m_ok.view(b, a, s, -1),
                a_idx, a_rel, a_ok)

    def forward(self, map_enc: MapEncoding, pose: torch.Tensor, valid: torch.Tensor, in_token: torch.Tensor,
                agent_type: torch.Tensor, extent: torch.Tensor, m2a_nbr: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Teacher forcing over all steps. pose ``(B, A, S, 3)`` at step boundaries, valid ``(B, A, S)``,
        in_token ``(B, A, S)``. Returns logits per type name ``(B, A, S, V_type)``."""
        b, a, s, _ = pose.shape
        x = self.embed_agents(in_token, agent_type, extent)
        w = torch.arange(TEMPORAL_WINDOW, device=pose.device)
        src = torch.arange(s, device=pose.device)[:, None] - w  # (S, W): step attended to
        t_ok = (src >= 0)[None, None] & valid[..., None] & _gather_steps(valid, src.clamp(min=0))
        kp = _gather_steps(pose, src.clamp(min=0))  # (B, A, S, W, 3)
        rel_t = self.t_rel(relative_pose(pose[..., None, :], kp), -w.to(pose.dtype) * TOKEN_SECONDS)
        spatial = self._spatial(pose, valid, map_enc, m2a_nbr)
        idx_t = _flat(src.clamp(min=0).expand(b * a, s, -1), s).reshape(b * a * s, -1)
        for i in range(self.cfg.agent_layers):
            x = self._layer(i, x, x.reshape(b * a * s, -1), idx_t, rel_t, t_ok, map_enc, *spatial)
        return self.logits(x)

    def loss(self, batch: TokenBatch) -> tuple[torch.Tensor, int, dict]:
        """Behaviour cloning, teacher-forced: the cross-entropy of the next token (label smoothing 0.1) *summed*
        over every valid target, their count, and the next-token accuracy (the trainer divides by the count
        summed over all processes)."""
        enc = self.encode_map(batch.map_points, batch.map_pose, batch.map_type, batch.map_valid, nbr=batch.map_nbr,
                              rows=batch.map_rows)
        logits = self(enc, batch.pose, batch.valid, batch.in_token, batch.agent_type, batch.extent,
                      m2a_nbr=batch.m2a_nbr)
        total = batch.pose.new_zeros(())
        count = correct = 0
        for name, lg in logits.items():
            sel = (batch.agent_type[..., None] == _type_of(name)) & (batch.target >= 0) & batch.valid
            if not sel.any():
                total = total + 0.0 * lg.sum()  # keep every head in the graph
                continue
            target = batch.target[sel]
            chosen = lg[sel]
            total = total + F.cross_entropy(chosen, target, label_smoothing=LABEL_SMOOTHING, reduction="sum")
            count += int(sel.sum())
            correct += int((chosen.argmax(-1) == target).sum())
        return total, count, {"accuracy": correct / max(count, 1)}

    def cache_map(self, map_enc: MapEncoding) -> MapEncoding:
        """The encoding with every decoder layer's map->agent keys/values projected once (for rollouts, where
        the map stays fixed for the whole episode)."""
        flat = map_enc.feat.reshape(-1, map_enc.feat.shape[-1])
        return MapEncoding(map_enc.feat, map_enc.pose, map_enc.valid, [layer.project(flat) for layer in self.m2a],
                           map_enc.rows, map_enc.grid)

    def logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.head_norm(x)
        return {name: self.heads[name](h) for name in self.types}

    def step(self, cache: dict, map_enc: MapEncoding, pose: torch.Tensor, valid: torch.Tensor,
             in_token: torch.Tensor, agent_type: torch.Tensor, extent: torch.Tensor) -> dict[str, torch.Tensor]:
        """One new step from ``cache`` (a dict, empty at the start of an episode; updated in place): pose
        ``(B, A, 3)``, valid ``(B, A)``, in_token ``(B, A)``. Returns logits ``(B, A, V)`` per type name."""
        pose, valid, in_token = pose[:, :, None], valid[:, :, None], in_token[:, :, None]
        x = self.embed_agents(in_token, agent_type, extent)
        past_pose = cache.get("pose", pose[:, :, :0])  # (B, A, W', 3)
        past_valid = cache.get("valid", valid[:, :, :0])
        all_pose = torch.cat([past_pose, pose], dim=2)[:, :, -TEMPORAL_WINDOW:]
        all_valid = torch.cat([past_valid, valid], dim=2)[:, :, -TEMPORAL_WINDOW:]
        n = all_pose.shape[2]
        order = torch.arange(n - 1, -1, -1, device=pose.device)  # newest first, as in forward (w = 0, 1, ...)
        kp, t_ok = all_pose[:, :, order][:, :, None], (all_valid[:, :, order] & valid)[:, :, None]
        w = torch.arange(n, device=pose.device, dtype=pose.dtype)
        rel_t = self.t_rel(relative_pose(pose[..., None, :], kp), -w * TOKEN_SECONDS)
        spatial = self._spatial(pose, valid, map_enc)
        layers = cache.get("x", [None] * self.cfg.agent_layers)
        new_layers = []
        b, a = valid.shape[:2]
        idx_t = _flat(order.expand(b * a, 1, -1), n).reshape(b * a, -1)
        for i in range(self.cfg.agent_layers):
            hist = x if layers[i] is None else torch.cat([layers[i], x], dim=2)
            hist = hist[:, :, -TEMPORAL_WINDOW:]
            new_layers.append(hist)
            x = self._layer(i, x, hist.reshape(b * a * n, -1), idx_t, rel_t, t_ok, map_enc, *spatial)
        cache.update(pose=all_pose, valid=all_valid, x=new_layers)
        return {name: v[:, :, 0] for name, v in self.logits(x).items()}


def _type_of(name: str) -> int:
    return int(next(k for k, v in TYPE_NAMES.items() if v == name))


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
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


def _flat(idx: torch.Tensor, m: int) -> torch.Tensor:
    """Row indices ``idx`` ``(G, Q, K)`` into groups of ``m`` rows -> indices into the ``G * m`` stacked rows."""
    return idx + (torch.arange(idx.shape[0], device=idx.device) * m).view(-1, *([1] * (idx.dim() - 1)))


def _gather_steps(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, A, S, ...)`` at steps ``src`` ``(S, W)`` -> ``(B, A, S, W, ...)``."""
    return x[:, :, src]


# ---- the closed-loop agent ---------------------------------------------------------------------------------------

from agents.base import PlanningAgent  # noqa: E402  (below the model: the agent wraps it)
from agents.registry import register_agent  # noqa: E402
from agents.tokenizer import (  # noqa: E402
    TOKEN_BOX,
    TOKEN_STEPS,
    cached_map_pieces,
    map_piece_grid_table,
    map_piece_neighbours,
    nearest_final,
    token_poses,
)
from envs.dynamics import StatePose  # noqa: E402
from envs.map_index import lane_exits, passed_exit  # noqa: E402
from envs.types import Action  # noqa: E402


@register_agent("smart")
class SmartAgent(PlanningAgent):
    """The tokenized policy as an agent: every 0.5 s it encodes the new step of every agent (one incremental
    decoder step from its per-layer cache) and samples each driven agent's next token (top-K, temperature), whose
    poses it then plays over the next 5 steps.

    The token that led into the current pose is the one it sampled for the agents it drove through the last 0.5 s;
    log-replayed or otherwise driven agents are tokenized on the fly (the token nearest to their actual motion).
    At an episode's first step the logged history is fed in 0.5 s steps (up to 5 of them). Every piece of each
    map of the batch is encoded once per episode (shared by the rows on it, e.g. the R copies of a scene in an
    evaluation). Driven agents that pass a map exit leave the scene (``act``).

    ``make_agent("smart", checkpoint="towns-nano")`` (bundled) or ``checkpoint=DIR/model.safetensors``; ``top_k``
    (default 48: the best realism of 5 / 16 / 48 on 16 towns *train* scenes) and ``temperature`` shape the
    sampling.
    """

    dynamics = StatePose()
    horizon = TOKEN_STEPS
    replan_every = TOKEN_STEPS
    has_weights = True

    def __init__(self, model: SmartModel | None = None, top_k: int = 48, temperature: float = 1.0):
        super().__init__()
        if model is None:
            from envs.errors import CheckpointError

            raise CheckpointError("The smart agent needs trained weights: make_agent('smart', checkpoint=PATH) "
                                  "(train one with `trafficgym train bc`), or one of the bundled "
                                  f"{sorted(PRETRAINED)} (e.g. checkpoint='towns-nano', trained on the towns data).")
        if top_k < 1 or temperature <= 0:
            raise ValueError(f"top_k must be >= 1 and temperature > 0, got {top_k}, {temperature}.")
        self.model = model.eval()
        self.top_k, self.temperature = top_k, temperature
        self._cache: dict | None = None

    @classmethod
    def from_checkpoint(cls, path, **config) -> SmartAgent:
        from agents.checkpoint import load_checkpoint, load_state_dict_strict
        from envs.errors import CheckpointError

        if str(path) in PRETRAINED:
            path = PRETRAINED[str(path)]
        elif not Path(path).exists():
            import difflib

            near = difflib.get_close_matches(str(path), PRETRAINED, n=1)
            raise CheckpointError(f"No checkpoint file {path} and no bundled smart weights of that name (bundled: "
                                  f"{sorted(PRETRAINED)})" + (f". Did you mean {near[0]!r}?" if near else "."))
        cfg_json, tensors, _ = load_checkpoint(path, expected_agent="smart")
        try:
            tol = float(cfg_json.pop("tol"))
            cfg = SmartConfig(**cfg_json)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a smart model configuration ({e}).") from e
        vocab = MotionVocabulary.from_tensors(tensors, tol, prefix="vocab_")
        model = SmartModel(cfg, vocab)
        load_state_dict_strict(model, {k: v for k, v in tensors.items() if not k.startswith("optim.")}, path)
        return cls(model, **config)

    # ---- episode set-up ------------------------------------------------------------------------------------
    def reset(self, state, mask, seed=None, slots=None):
        super().reset(state, mask, seed, slots)
        kinds = state.agent_type[mask & state.agent_mask].unique().tolist()
        for k in kinds:
            if TYPE_NAMES.get(AgentType(int(k))) not in self.model.types:
                from envs.errors import VocabularyError

                raise VocabularyError(f"The smart model has no tokens for {AgentType(int(k)).name} agents; drive "
                                      "them with another policy (e.g. traffic=[('smart', 'vehicles')]).")
        b = state.batch_size
        fresh_cache = slots is None or self._cache is None or self._cache["pose"].shape[:2] != (b, state.num_agents)
        rows = list(range(b)) if fresh_cache else [int(s) for s in slots]
        if fresh_cache:
            self._cache = self._empty_cache(state)
            self._encoded: dict = {}  # map id -> its encoding, kept while slots reset (the weights are fixed)
            self._batch_maps: dict = {}  # the map ids of the batch -> their stacked, cached encoding and grid
            self._token = torch.full((b, state.num_agents), -1, dtype=torch.long, device=state.device)
            self._token_t = torch.full_like(self._token, -10**9)  # step at which _token was sampled
        else:
            self._cache["valid"][rows] = False
            self._token_t[rows] = -10**9
        self._map = self._encode_maps(state)
        self._exits = [torch.as_tensor(lane_exits(m), device=state.device) for m in state.maps.sources]
        self._fresh = torch.zeros(b, dtype=torch.bool)
        self._fresh[rows] = True

    def _empty_cache(self, state) -> dict:
        b, a, d = state.batch_size, state.num_agents, self.model.cfg.hidden
        dev = state.device
        return {"pose": torch.zeros(b, a, TEMPORAL_WINDOW, 3, device=dev),
                "valid": torch.zeros(b, a, TEMPORAL_WINDOW, dtype=torch.bool, device=dev),
                "x": [torch.zeros(b, a, TEMPORAL_WINDOW, d, device=dev) for _ in range(self.model.cfg.agent_layers)]}

    @torch.no_grad()
    def _encode_maps(self, state) -> MapEncoding:
        """Every piece of each map of the batch (``state.maps``), encoded once per map and shared by the rows on
        it. The whole map, not a crop around the logged tracks: where the agents will drive is not known. The
        stacked encoding (with its projected keys/values and neighbour grid) is kept per set of maps: a vector
        env's slot resets come back with the same maps."""
        cfg, dev = self.model.cfg, state.device
        maps = tuple(m.map_id for m in state.maps.sources)
        if maps not in self._batch_maps:
            for m in state.maps.sources:
                if m.map_id not in self._encoded:
                    p = cached_map_pieces(m)
                    nbr = map_piece_neighbours(m, cfg.k_map, cfg.map_radius)
                    self._encoded[m.map_id] = self.model.encode_map(
                        torch.as_tensor(p["points"], device=dev)[None], torch.as_tensor(p["pose"], device=dev)[None],
                        torch.as_tensor(p["type"], device=dev)[None],
                        torch.ones(1, len(p["pose"]), dtype=torch.bool, device=dev),
                        nbr=torch.as_tensor(nbr, device=dev)[None])
            encs = [self._encoded[m] for m in maps]
            u, width, d = len(encs), max(e.feat.shape[1] for e in encs), encs[0].feat.shape[-1]
            feat = torch.zeros(u, width, d, device=dev)
            pose = torch.zeros(u, width, 3, device=dev)
            valid = torch.zeros(u, width, dtype=torch.bool, device=dev)
            for i, e in enumerate(encs):
                n = e.feat.shape[1]
                feat[i, :n], pose[i, :n], valid[i, :n] = e.feat[0], e.pose[0], e.valid[0]
            grid = RadiusGrid.stack([map_piece_grid_table(m, cfg.m2a_radius, MAP_GRID_CELL)
                                     for m in state.maps.sources], cfg.m2a_radius, MAP_GRID_CELL, dev)
            self._batch_maps[maps] = self.model.cache_map(MapEncoding(feat, pose, valid, grid=grid))
        rows = torch.as_tensor(state.map_idx, dtype=torch.long, device=dev)
        return replace(self._batch_maps[maps], rows=rows)

    # ---- acting --------------------------------------------------------------------------------------------
    def act(self, state, mask):
        """The plan's next pose; agents whose next pose drives through a map exit (``envs.map_index.lane_exits``:
        where the lane graph ends at the map border) leave the scene, as the logged vehicles do there."""
        action = super().act(state, mask)
        gone = torch.zeros_like(mask)
        for u, exits in enumerate(self._exits):
            rows = state.map_idx == u
            if len(exits) and rows.any():
                gone[rows] = passed_exit(action.data[rows][..., :2].float(), exits)
        return Action(action.data, action.valid, remove=gone & mask)

    # ---- planning ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def plan(self, state, mask):
        b = torch.arange(state.batch_size, device=state.device)
        live = state.current_valid & state.agent_mask
        stale = (self._age >= self.replan_every).to(state.device)  # the rows that replan now
        fresh = self._fresh.to(state.device) & stale
        if fresh.any():  # feed the logged history, 0.5 s at a time, into the rows that just started
            for back in range(min(int(state.t.max()), (TEMPORAL_WINDOW - 1) * TOKEN_STEPS), 0, -TOKEN_STEPS):
                t_hist = (state.t - back).clamp(min=0)
                ok = state.valid[b, :, t_hist] & state.agent_mask & (state.t >= back)[:, None]
                self._advance(state, t_hist, ok, fresh)
            self._fresh[fresh.cpu()] = False
        logits = self._advance(state, state.t, live, stale)
        pose = state.current[..., :3]
        out = pose[:, :, None, :].expand(-1, -1, self.horizon, -1).clone()  # standing, for agents not driven
        for name in self.model.types:
            sel = (state.agent_type == _type_of(name)) & mask & live
            if not sel.any():
                continue
            tok = self._sample(logits[name][sel])
            out[sel] = token_poses(self.model.vocab(name), tok, pose[sel].float()).to(out.dtype)
            self._token[sel], self._token_t[sel] = tok, state.t[:, None].expand_as(sel)[sel]
        return out

    def _advance(self, state, t: torch.Tensor, ok: torch.Tensor, rows: torch.Tensor) -> dict:
        """One decoder step at steps ``t`` ``(B,)``; the cache advances only in ``rows``."""
        b = torch.arange(state.batch_size, device=state.device)
        pose = state.traj[b, :, t][..., :3].float()
        prev_t = (t - TOKEN_STEPS).clamp(min=0)
        prev = state.traj[b, :, prev_t][..., :3].float()
        prev_ok = state.valid[b, :, prev_t] & (t >= TOKEN_STEPS)[:, None] & ok
        in_token = torch.full(ok.shape, -1, dtype=torch.long, device=state.device)
        # agents this policy drove through the last 0.5 s moved exactly by the token it sampled then
        ours = prev_ok & (self._token_t == (t - TOKEN_STEPS)[:, None])
        in_token[ours] = self._token[ours]
        for name in self.model.types:
            sel = (state.agent_type == _type_of(name)) & prev_ok & ~ours
            if sel.any():
                from agents.layers import relative_pose

                local = relative_pose(prev[sel], pose[sel])
                idx, _ = nearest_final(self.model.vocab(name), local, TOKEN_BOX_OF[name])
                in_token[sel] = idx.to(in_token.device)
        cache = {k: (v if k != "x" else list(v)) for k, v in self._cache.items()}
        logits = self.model.step(cache, self._map, pose, ok, in_token, state.agent_type, state.extent.float())
        keep = ~rows
        for key in ("pose", "valid"):
            cache[key][keep] = self._cache[key][keep]
        for i, x in enumerate(cache["x"]):
            x[keep] = self._cache["x"][i][keep]
        self._cache = cache
        return logits

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, logits.shape[-1])
        top, idx = (logits.float() / self.temperature).topk(k, dim=-1)
        probs = torch.softmax(top, dim=-1).cpu()
        pick = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        return idx.gather(-1, pick.to(idx.device)[:, None]).squeeze(-1)


TOKEN_BOX_OF = {name: TOKEN_BOX[k] for k, name in TYPE_NAMES.items()}
