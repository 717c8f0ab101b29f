"""The tokenized policy as an agent (``make_agent("smart")``): closed-loop rollouts of ``SmartModel``, sampling
one 0.5 s motion token per agent and step (top-k, temperature) and serving the token's poses step by step."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from agents.base import PlanningAgent
from agents.nn.map_encoder import MapEncoding, encode_map_batch
from agents.registry import register_agent
from agents.smart.model import PRETRAINED, TEMPORAL_WINDOW, SmartConfig, SmartModel, type_of
from agents.smart.tokenizer import (
    TOKEN_BOX,
    TOKEN_STEPS,
    TYPE_NAMES,
    MotionVocabulary,
    nearest_final,
    token_poses,
)
from envs.dynamics import StatePose
from envs.map_index import lane_exits, passed_exit
from envs.types import Action, AgentType


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

        bundled = cls.bundled_weights()
        if str(path) in bundled:
            path = bundled[str(path)]
        elif not Path(path).exists():
            import difflib

            from agents.registry import AGENTS

            for other, factory in AGENTS.items():
                if other != cls.name and str(path) in getattr(factory, "bundled_weights", dict)():
                    raise CheckpointError(f"{path!s} is a bundled {other!r} checkpoint, not {cls.name!r}: load it "
                                          f"with make_agent({other!r}, checkpoint={str(path)!r}).")
            near = difflib.get_close_matches(str(path), bundled, n=1)
            raise CheckpointError(f"No checkpoint file {path} and no bundled {cls.name} weights of that name "
                                  f"(bundled: {sorted(bundled)})" + (f". Did you mean {near[0]!r}?" if near else "."))
        cfg_json, tensors, _ = load_checkpoint(path, expected_agent=cls.name)
        try:
            tol = float(cfg_json.pop("tol"))
            model = cls.model_from_config(cfg_json, MotionVocabulary.from_tensors(tensors, tol, prefix="vocab_"))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a {cls.name} model configuration ({e}).") from e
        load_state_dict_strict(model, {k: v for k, v in tensors.items() if not k.startswith("optim.")}, path)
        return cls(model, **config)

    @staticmethod
    def bundled_weights() -> dict:
        """The weights that ship with the package, by name."""
        return PRETRAINED

    @staticmethod
    def model_from_config(cfg_json: dict, vocab: MotionVocabulary) -> SmartModel:
        """The model of a checkpoint's configuration (``TypeError`` / ``KeyError`` if it is not one)."""
        return SmartModel(SmartConfig(**cfg_json), vocab)

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
        it (``agents.nn.map_encoder.encode_map_batch``). The stacked encoding (with its projected keys/values and
        neighbour grid) is kept per set of maps: a vector env's slot resets come back with the same maps."""
        dev = state.device
        maps = tuple(m.map_id for m in state.maps.sources)
        if maps not in self._batch_maps:
            self._batch_maps[maps] = self.model.cache_map(encode_map_batch(
                self.model.map_encoder, state.maps.sources, self._encoded, self.model.cfg.m2a_radius, dev))
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
        live = state.current_valid & state.agent_mask
        logits = self._encode_now(state)
        pose = state.current[..., :3]
        out = pose[:, :, None, :].expand(-1, -1, self.horizon, -1).clone()  # standing, for agents not driven
        for name in self.model.types:
            sel = (state.agent_type == type_of(name)) & mask & live
            if not sel.any():
                continue
            tok = self._choose(name, logits[name][sel], state, sel)
            out[sel] = token_poses(self.model.vocab(name), tok, pose[sel].float()).to(out.dtype)
            self._token[sel], self._token_t[sel] = tok, state.t[:, None].expand_as(sel)[sel]
        return out

    def _encode_now(self, state):
        """One decoder step at the current step in the rows that replan now (after feeding the logged history,
        0.5 s at a time, into the rows that just started); the model's ``step`` output."""
        b = torch.arange(state.batch_size, device=state.device)
        stale = (self._age >= self.replan_every).to(state.device)
        fresh = self._fresh.to(state.device) & stale
        if fresh.any():
            for back in range(min(int(state.t.max()), (TEMPORAL_WINDOW - 1) * TOKEN_STEPS), 0, -TOKEN_STEPS):
                t_hist = (state.t - back).clamp(min=0)
                ok = state.valid[b, :, t_hist] & state.agent_mask & (state.t >= back)[:, None]
                self._advance(state, t_hist, ok, fresh)
            self._fresh[fresh.cpu()] = False
        return self._advance(state, state.t, state.current_valid & state.agent_mask, stale)

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
            sel = (state.agent_type == type_of(name)) & prev_ok & ~ours
            if sel.any():
                from agents.nn.attention import relative_pose

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

    def _choose(self, name: str, logits: torch.Tensor, state, sel: torch.Tensor) -> torch.Tensor:
        """The next token of the agents ``sel`` ``(B, A)`` of type ``name`` from their logits ``(N, V)``: top-k
        sampling (subclasses choose otherwise, e.g. ``CatKRollout``)."""
        return self._sample(logits)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, logits.shape[-1])
        top, idx = (logits.float() / self.temperature).topk(k, dim=-1)
        probs = torch.softmax(top, dim=-1).cpu()
        pick = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        return idx.gather(-1, pick.to(idx.device)[:, None]).squeeze(-1)


TOKEN_BOX_OF = {name: TOKEN_BOX[k] for k, name in TYPE_NAMES.items()}


def logged_pose_ahead(state) -> tuple[torch.Tensor, torch.Tensor]:
    """Every agent's logged pose one token (0.5 s) after the current step, ``(B, A, 3)``, and whether it is there
    to compare with ``(B, A)``: valid in the log, and the episode does not end first (CAT-K's rollouts)."""
    b = torch.arange(state.batch_size, device=state.device)
    t_next = (state.t + TOKEN_STEPS).clamp(max=state.log.shape[2] - 1)
    ok = state.log_valid[b, :, t_next] & (state.t + TOKEN_STEPS <= state.end)[:, None]
    return state.log[b, :, t_next][..., :3], ok


class CatKRollout(SmartAgent):
    """The rollout of CAT-K fine-tuning (``agents/smart/catk.py``): instead of sampling, each driven agent takes
    the closest among its ``top_k`` most likely tokens to its logged box 0.5 s later (the most likely where the
    log is not valid then or the scene ends first). ``choice="topk"``: plain top-k sampling instead (the
    ablation without the log in the loop). It reads the future log, so it is a training device, not a sim agent:
    it is not registered."""

    CHOICES = ("catk", "topk")

    def __init__(self, model: SmartModel, top_k: int = 32, record_logits: bool = False, choice: str = "catk"):
        super().__init__(model, top_k=top_k)
        if choice not in self.CHOICES:
            from envs.errors import UnknownNameError

            raise UnknownNameError("CAT-K rollout choice", choice, self.CHOICES)
        self.record_logits, self.choice = record_logits, choice
        self.chosen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def reset(self, state, mask, seed=None, slots=None):
        super().reset(state, mask, seed, slots)
        self.chosen = []

    def chosen_in_row(self, b: int):
        """Row ``b``'s choices of the last rollout, in order: (step, agents ``(A,)``, tokens ``(n,)``, their logits
        ``(n, V)`` or None), each choice of ``chosen`` split by row (its tokens follow the ``(B, A)`` mask's
        row-major order)."""
        for t, sel, tok, logits in self.chosen:
            counts = sel.sum(1).tolist()
            lo = sum(counts[:b])
            part = slice(lo, lo + counts[b])
            yield int(t[b]), sel[b], tok[part], None if logits is None else logits[part]

    def _choose(self, name, logits, state, sel):
        """The CAT-K token; every choice is recorded in ``chosen`` as (step ``(B,)``, agents ``(B, A)``, tokens
        ``(N,)``, their logits ``(N, V)`` if ``record_logits``), for the fine-tuning batch."""
        from agents.smart.catk import closest_among_top_k

        if self.choice == "topk":  # the ablation: plain top-k sampling, no log in the loop
            tok = self._sample(logits)
            self.chosen.append((state.t.clone(), sel.clone(), tok,
                                logits.float().clone() if self.record_logits else None))
            return tok
        log_next, ok = logged_pose_ahead(state)
        tok = closest_among_top_k(logits.float(), self.model.vocab(name), state.current[..., :3][sel].float(),
                                  log_next[sel].float(), ok[sel], TOKEN_BOX_OF[name], min(self.top_k, logits.shape[-1]))
        self.chosen.append((state.t.clone(), sel.clone(), tok, logits.float().clone() if self.record_logits else None))
        return tok
