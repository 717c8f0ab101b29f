"""SMART-style tokenized sim-agent policy: a map encoder and an autoregressive agent decoder over 0.5 s motion
tokens (Wu et al., SMART, arXiv 2405.15677; Zhang et al., CAT-K, arXiv 2412.05334), reimplemented in our own
code.

Inputs per scene. Map: 5 m polyline pieces (``agents.nn.map_pieces``: local points, pose, type). Agents: at each
0.5 s step ``s``, the pose at the step boundary, the token that led into it (``BOS`` at the first step), the
agent's type and box size. The model predicts the token of the next 0.5 s.

Network. Map encoder (``agents.nn.map_encoder.MapEncoder``): ``map_layers`` blocks of self-attention over each
piece's nearest pieces within ``map_radius``. Agent decoder: ``agent_layers`` blocks of (temporal attention over
the agent's own previous ``TEMPORAL_WINDOW`` steps; map→agent attention over the nearest pieces within
``m2a_radius``; agent↔agent attention over the nearest agents at the same step within ``a2a_radius``). All
attention uses relative pose encodings (``agents/nn/attention.py``). Head: one linear layer per agent type onto
that type's vocabulary.

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

from agents.nn.attention import NeighbourAttention, RelPoseEncoding, flat_index, gather, knn, relative_pose
from agents.nn.map_encoder import GRID_CELL, MapEncoder, MapEncoding
from agents.smart.tokenizer import TOKEN_STEPS, TYPE_NAMES, MotionVocabulary
from envs.types import AgentType

TOKEN_SECONDS = 0.5
# Weights that ship with the package, by name: ``make_agent("smart", checkpoint="towns-nano")``. Each was made by
# the command in the README's training section (the file's metadata holds its training config).
PRETRAINED = {"towns-nano": Path(__file__).parents[1] / "weights" / "smart_nano_towns.safetensors",
              # the same recipe trained 3,000 steps instead of 2,000: the best learned sim agent (README)
              "towns-nano-3k": Path(__file__).parents[1] / "weights" / "smart_nano_3k_towns.safetensors",
              # 600 CAT-K steps from towns-nano-3k (as good on realism; not chosen for the demo on val)
              "towns-nano-catk": Path(__file__).parents[1] / "weights" / "smart_nano_catk_towns.safetensors"}
TEMPORAL_WINDOW = 6  # steps of history each step attends to (itself included)
MAP_GRID_CELL = GRID_CELL  # m: cell of the rollout's map->agent neighbour grid (``RadiusGrid``)
TOKEN_INPUT = (TOKEN_STEPS + 1) * 3  # a token's embedding input: its TOKEN_STEPS + 1 poses (x, y, heading), flat
TEMPORAL_SCALE = 30.0  # m: Fourier scale of the temporal attention's relative poses (an agent's own past 2.5 s)
# checkpoints written before the map encoder became its own module keep its tensors at the top level
_MAP_ENCODER_KEYS = ("piece_mlp.", "piece_type.", "piece_light.", "map_rel.", "map_layers.")

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
    label_smoothing: float = 0.1  # of the next-token cross-entropy (SMART's BC; CAT-K fine-tunes with 0)

    @classmethod
    def of_size(cls, size: str, vocab_sizes: dict, **overrides) -> SmartConfig:
        """The preset ``size`` (``SIZES``) with ``overrides`` of its fields (e.g. ``k_m2a=32``), checked by name
        and type."""
        from envs.errors import InvalidOptionError, UnknownNameError

        if size not in SIZES:
            raise UnknownNameError("SMART size", size, SIZES)
        tunable = [f for f in cls.__dataclass_fields__ if f not in ("size", "vocab_sizes")]
        for key, value in overrides.items():
            if key not in tunable:
                raise UnknownNameError("SMART configuration field", key, tunable)
            kind = int if isinstance(SIZES["nano"].get(key), int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                    (kind is int and (value != int(value) or value < 1)):
                need = "a positive integer" if kind is int else "a number >= 0"
                raise InvalidOptionError(f"SMART configuration field {key} needs {need}, got {value!r}.")
            overrides[key] = kind(value)
        return cls(size=size, vocab_sizes=dict(vocab_sizes), **{**SIZES[size], **overrides})

    def to_json(self) -> dict:
        return asdict(self)


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
    # pose targets (``agents.gmm_ego``): the logged pose 0.5 s ahead in the frame of the input pose
    next_pose: torch.Tensor | None = None  # (B, A, S, 3) float: x, y, heading
    next_pose_valid: torch.Tensor | None = None  # (B, A, S) bool: the agent-steps trained on

    def to(self, device: torch.device | str) -> TokenBatch:
        """The batch with every tensor on ``device``."""
        return replace(self, **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in fields(self)})

    @property
    def num_targets(self) -> int:
        """Valid next-token targets in the batch."""
        return int(((self.target >= 0) & self.valid).sum())


LABEL_SMOOTHING = 0.1  # the default of SmartConfig.label_smoothing (SMART's behaviour cloning)


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
        self.map_encoder = MapEncoder(d, cfg.heads, cfg.map_layers, cfg.map_radius, cfg.k_map, cfg.dropout)
        # agents
        self.token_mlp = nn.Sequential(nn.Linear(TOKEN_INPUT, d), nn.ReLU(), nn.Linear(d, d))
        self.bos = nn.Parameter(torch.zeros(d))
        self.agent_type = nn.Embedding(len(AgentType), d)
        self.size_mlp = nn.Sequential(nn.Linear(2, d), nn.ReLU(), nn.Linear(d, d))
        self.t_rel = RelPoseEncoding(d, TEMPORAL_SCALE)
        self.m2a_rel = RelPoseEncoding(d, cfg.m2a_radius)
        self.a2a_rel = RelPoseEncoding(d, cfg.a2a_radius)
        n = cfg.agent_layers
        self.temporal = nn.ModuleList(NeighbourAttention(d, cfg.heads, cfg.dropout) for _ in range(n))
        self.m2a = nn.ModuleList(NeighbourAttention(d, cfg.heads, cfg.dropout) for _ in range(n))
        self.a2a = nn.ModuleList(NeighbourAttention(d, cfg.heads, cfg.dropout) for _ in range(n))
        self.head_norm = nn.LayerNorm(d)
        self.heads = nn.ModuleDict({name: nn.Linear(d, cfg.vocab_sizes[name]) for name in self.types})

    @staticmethod
    def upgrade_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of a checkpoint written before the map encoder became its own module (its tensors at the
        top level: ``piece_mlp.*`` ...) under ``map_encoder.``; newer checkpoints pass unchanged."""
        return {f"map_encoder.{k}" if k.startswith(_MAP_ENCODER_KEYS) else k: v for k, v in tensors.items()}

    def vocab(self, name: str) -> torch.Tensor:
        return getattr(self, f"vocab_{name}")

    def motion_vocabulary(self) -> MotionVocabulary:
        """The vocabulary the model was built with (its tensors, no copy)."""
        return MotionVocabulary({name: self.vocab(name) for name in self.types}, self.tol)

    # ---- map -------------------------------------------------------------------------------------------------
    def encode_map(self, points: torch.Tensor, pose: torch.Tensor, kind: torch.Tensor, valid: torch.Tensor,
                   light: torch.Tensor | None = None, nbr: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> MapEncoding:
        """``MapEncoder.forward`` (``agents/nn/map_encoder.py``)."""
        return self.map_encoder(points, pose, kind, valid, light=light, nbr=nbr, rows=rows)

    # ---- agents ----------------------------------------------------------------------------------------------
    def embed_agents(self, in_token: torch.Tensor, agent_type: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
        """in_token ``(B, A, S)`` (-1: BOS), agent_type ``(B, A)``, extent ``(B, A, 2)`` -> ``(B, A, S, D)``."""
        emb = self.bos.expand(*in_token.shape, -1).clone()
        for name in self.types:
            kind = type_of(name)
            sel = (agent_type[..., None] == kind) & (in_token >= 0)
            if sel.any():
                shapes = self.vocab(name)[in_token[sel]].flatten(-2)  # (n, TOKEN_INPUT)
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
        x = self.a2a[i](xs, xs, flat_index(a_idx.reshape(b * s, a, -1), a).reshape(b * s * a, -1),
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
        a_rel = self.a2a_rel(relative_pose(ps[..., None, :], gather(ps, a_idx)))
        a_ok = a_ok & vs[..., None]
        return (m_idx.view(b, a, s, -1), m_rel.view(b, a, s, *m_rel.shape[-2:]), m_ok.view(b, a, s, -1),
                a_idx, a_rel, a_ok)

    def forward(self, map_enc: MapEncoding, pose: torch.Tensor, valid: torch.Tensor, in_token: torch.Tensor,
                agent_type: torch.Tensor, extent: torch.Tensor, m2a_nbr: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Teacher forcing over all steps. pose ``(B, A, S, 3)`` at step boundaries, valid ``(B, A, S)``,
        in_token ``(B, A, S)``. Returns logits per type name ``(B, A, S, V_type)``."""
        return self.logits(self.decode(map_enc, pose, valid, in_token, agent_type, extent, m2a_nbr))

    def decode(self, map_enc: MapEncoding, pose: torch.Tensor, valid: torch.Tensor, in_token: torch.Tensor,
               agent_type: torch.Tensor, extent: torch.Tensor, m2a_nbr: torch.Tensor | None = None) -> torch.Tensor:
        """The agent decoder over all steps (the inputs of ``forward``): features ``(B, A, S, D)`` before the
        head, shared by every head on this backbone (e.g. ``agents.gmm_ego``)."""
        b, a, s, _ = pose.shape
        x = self.embed_agents(in_token, agent_type, extent)
        w = torch.arange(TEMPORAL_WINDOW, device=pose.device)
        src = torch.arange(s, device=pose.device)[:, None] - w  # (S, W): step attended to
        t_ok = (src >= 0)[None, None] & valid[..., None] & _gather_steps(valid, src.clamp(min=0))
        kp = _gather_steps(pose, src.clamp(min=0))  # (B, A, S, W, 3)
        rel_t = self.t_rel(relative_pose(pose[..., None, :], kp), -w.to(pose.dtype) * TOKEN_SECONDS)
        spatial = self._spatial(pose, valid, map_enc, m2a_nbr)
        idx_t = flat_index(src.clamp(min=0).expand(b * a, s, -1), s).reshape(b * a * s, -1)
        for i in range(self.cfg.agent_layers):
            x = self._layer(i, x, x.reshape(b * a * s, -1), idx_t, rel_t, t_ok, map_enc, *spatial)
        return x

    def batch_features(self, batch: TokenBatch) -> torch.Tensor:
        """``decode`` of a whole ``TokenBatch`` (its map encoded first): features ``(B, A, S, D)``, teacher-forced."""
        enc = self.encode_map(batch.map_points, batch.map_pose, batch.map_type, batch.map_valid, nbr=batch.map_nbr,
                              rows=batch.map_rows)
        return self.decode(enc, batch.pose, batch.valid, batch.in_token, batch.agent_type, batch.extent,
                           batch.m2a_nbr)

    def loss(self, batch: TokenBatch) -> tuple[torch.Tensor, int, dict]:
        """Teacher-forced next-token cross-entropy (label smoothing ``cfg.label_smoothing``) *summed*
        over every valid target, their count, and the next-token accuracy (the trainer divides by the count
        summed over all processes)."""
        logits = self.logits(self.batch_features(batch))
        total = batch.pose.new_zeros(())
        count = correct = 0
        for name, lg in logits.items():
            sel = (batch.agent_type[..., None] == type_of(name)) & (batch.target >= 0) & batch.valid
            if not sel.any():
                total = total + 0.0 * lg.sum()  # keep every head in the graph
                continue
            target = batch.target[sel]
            chosen = lg[sel]
            total = total + F.cross_entropy(chosen, target, label_smoothing=self.cfg.label_smoothing,
                                           reduction="sum")
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
        x = self.decode_step(cache, map_enc, pose, valid, in_token, agent_type, extent)
        return {name: v[:, :, 0] for name, v in self.logits(x).items()}

    def decode_step(self, cache: dict, map_enc: MapEncoding, pose: torch.Tensor, valid: torch.Tensor,
                    in_token: torch.Tensor, agent_type: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
        """``step``'s decoder features ``(B, A, 1, D)`` (equal to ``decode``'s at that step; ``cache`` updated)."""
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
        idx_t = flat_index(order.expand(b * a, 1, -1), n).reshape(b * a, -1)
        for i in range(self.cfg.agent_layers):
            hist = x if layers[i] is None else torch.cat([layers[i], x], dim=2)
            hist = hist[:, :, -TEMPORAL_WINDOW:]
            new_layers.append(hist)
            x = self._layer(i, x, hist.reshape(b * a * n, -1), idx_t, rel_t, t_ok, map_enc, *spatial)
        cache.update(pose=all_pose, valid=all_valid, x=new_layers)
        return x


def type_of(name: str) -> int:
    """The ``AgentType`` of a vocabulary type name (``"vehicle"`` -> ``AgentType.VEHICLE``)."""
    return int(next(k for k, v in TYPE_NAMES.items() if v == name))


def _gather_steps(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, A, S, ...)`` at steps ``src`` ``(S, W)`` -> ``(B, A, S, W, ...)``."""
    return x[:, :, src]
