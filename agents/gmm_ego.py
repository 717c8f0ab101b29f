"""Gaussian-mixture ego policy (``make_agent("gmm_ego")``): the tokenized policy's backbone with a mixture head
over the ego's pose 0.5 s ahead (the ego variant of CAT-K, Zhang et al., arXiv 2412.05334).

Model (``GmmEgoModel``). The map encoder and agent decoder of ``agents.smart.SmartModel`` (the same code: the
subclass only swaps the head), so every agent's motion tokens are the context and the ego attends to its
neighbours and the map as the sim agents do. The head reads the decoder's feature of an agent-step ``(D,)`` and
gives ``components`` (16) mixture logits and per-component means of the pose 0.5 s ahead ``(x, y, heading)`` in
the agent's own frame, each an offset from the component's anchor (k-means of the training targets,
``set_anchors``). Each component is a diagonal Gaussian over ``(x, y, cos h, sin h)`` with the fixed
standard deviations ``GMM_STD`` = (1 m, 1 m, 0.1, 0.1); the loss is the negative log-likelihood of the logged next
pose in the frame of the input pose (``gmm_nll``).

Acting (``GmmEgoAgent``). Every 0.5 s it encodes the new step of every agent (one incremental decoder step, as the
tokenized policy), takes the ego's top-3 components and draws one with ``softmax(logit / temperature)``
(``temperature`` 1 by default; 0.1 is nearly the most likely), and drives toward that component's pose with the
kinematic bicycle (``envs.dynamics.InvertibleBicycle``): one constant acceleration and curvature for the next 5
steps along the arc to the target pose, ending at its mean speed (``bicycle_toward``, ``tracking="speed"``). The
bicycle, not pose interpolation, because its motion is feasible by construction (bounded acceleration and
curvature, no turning on the spot, no reversing) and because it is the ego env's own action space: the same actions
drive ``trafficgym/Ego-v0`` (``agents.env_policy.AgentPolicy``). The other agents are driven by whatever drives
them (log, IDM, the tokenized policy); their motion is tokenized on the fly as the tokenized policy does for agents
it does not drive.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from agents.registry import register_agent
from agents.smart.agent import SmartAgent, logged_pose_ahead
from agents.smart.model import SmartConfig, SmartModel, TokenBatch
from agents.smart.tokenizer import TOKEN_STEPS, MotionVocabulary
from envs.dynamics import InvertibleBicycle, speed_along_heading
from envs.geometry import wrap_angle
from envs.types import AgentType

N_COMPONENTS = 16  # mixture components (CAT-K's ego policy)
GMM_STD = (1.0, 1.0, 0.1, 0.1)  # fixed standard deviations over (x m, y m, cos h, sin h)
TOP_COMPONENTS = 3  # the components the agent (and CAT-K's rollout) chooses among
# Bundled weights by name (``make_agent("gmm_ego", checkpoint="towns-gmm")``), each made by the README command.
PRETRAINED = {"towns-gmm": Path(__file__).parent / "weights" / "gmm_nano_towns.safetensors",
              "towns-gmm-catk": Path(__file__).parent / "weights" / "gmm_catk_nano_towns.safetensors",
              "towns-gmm-ppo": Path(__file__).parent / "weights" / "gmm_ppo_nano_towns.safetensors"}


def gmm_nll(logits: torch.Tensor, mean: torch.Tensor, target: torch.Tensor,
            std: tuple[float, ...] = GMM_STD) -> torch.Tensor:
    """Negative log-likelihood of poses under the mixture: logits ``(N, K)``, component means ``(N, K, 3)`` and
    targets ``(N, 3)`` (x, y, heading) -> ``(N,)``. Each component is a diagonal Gaussian over
    ``(x, y, cos h, sin h)`` with standard deviations ``std``."""
    def features(p):
        return torch.stack([p[..., 0], p[..., 1], torch.cos(p[..., 2]), torch.sin(p[..., 2])], dim=-1)

    sigma = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    z = (features(target)[:, None] - features(mean)) / sigma  # (N, K, 4)
    log_normal = -0.5 * (z ** 2).sum(-1) - torch.log(sigma).sum() - 2.0 * math.log(2.0 * math.pi)
    return -torch.logsumexp(F.log_softmax(logits, dim=-1) + log_normal, dim=-1)


class GmmEgoModel(SmartModel):
    """The tokenized policy's map encoder and agent decoder with a mixture head instead of the token heads.

    ``forward`` / ``step`` take the inputs of ``SmartModel.forward`` / ``step`` and return ``(logits, mean)``:
    mixture logits ``(B, A, S, K)`` and component means ``(B, A, S, K, 3)`` (x, y, heading 0.5 s ahead in the
    agent's frame; ``step``: without the ``S`` axis), for every agent (cheap; only the ego's are used)."""

    def __init__(self, cfg: SmartConfig, vocab: MotionVocabulary, components: int = N_COMPONENTS):
        super().__init__(cfg, vocab)
        if components < 1:
            from envs.errors import InvalidOptionError

            raise InvalidOptionError(f"components must be >= 1, got {components}.")
        del self.heads  # the token heads: this model predicts the ego's pose, not tokens
        self.components = components
        d = cfg.hidden
        self.gmm_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, components * 4))
        # each component's mean is its anchor plus the head's offset (set_anchors; zeros until then)
        self.register_buffer("anchors", torch.zeros(components, 3))

    def mixture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder features ``(..., D)`` -> logits ``(..., K)``, means ``(..., K, 3)`` (anchor + offset)."""
        out = self.gmm_head(self.head_norm(x)).unflatten(-1, (self.components, 4))
        return out[..., 0], self.anchors + out[..., 1:]

    @torch.no_grad()
    def set_anchors(self, targets: torch.Tensor, seed: int = 0, iterations: int = 25) -> torch.Tensor:
        """Spread the components over the motions of ``targets`` ``(N, 3)`` (next poses x, y, heading): k-means
        (k-means++ seeding, ``seed``) of the targets, one anchor per component. With every mean starting at the
        same place, the mixture NLL lets the first component that fits take every target, and the others never
        learn (measured: one component with probability 1.0 at every step); anchored means start where the
        data is, each nearest to its own share of it (MultiPath's anchors, Chai et al., arXiv 1910.05449)."""
        x = targets.double()
        x = torch.cat([x[:, :2], 5.0 * x[:, 2:3]], dim=-1)  # heading in metres-equivalent: 0.2 rad ~ 1 m
        g = torch.Generator().manual_seed(seed)
        centres = x[torch.randint(len(x), (1,), generator=g)]
        while len(centres) < self.components:  # k-means++ seeding
            d2 = torch.cdist(x, centres).min(dim=1).values ** 2
            weights = d2 if d2.sum() > 0 else torch.ones_like(d2)  # fewer distinct targets than components
            centres = torch.cat([centres, x[torch.multinomial(weights / weights.sum(), 1, generator=g)]])
        for _ in range(iterations):
            assign = torch.cdist(x, centres).argmin(dim=1)
            for k in range(self.components):
                if (assign == k).any():
                    centres[k] = x[assign == k].mean(dim=0)
        anchors = torch.cat([centres[:, :2], centres[:, 2:3] / 5.0], dim=-1)
        self.anchors.copy_(anchors.to(self.anchors))
        return self.anchors

    def forward(self, map_enc, pose, valid, in_token, agent_type, extent, m2a_nbr=None):
        return self.mixture(self.decode(map_enc, pose, valid, in_token, agent_type, extent, m2a_nbr))

    def step(self, cache, map_enc, pose, valid, in_token, agent_type, extent):
        logits, mean = self.mixture(self.decode_step(cache, map_enc, pose, valid, in_token, agent_type, extent))
        return logits[:, :, 0], mean[:, :, 0]

    def loss(self, batch: TokenBatch) -> tuple[torch.Tensor, int, dict]:
        """Mixture NLL of ``batch.next_pose`` (the logged pose 0.5 s ahead in the input pose's frame) *summed* over
        the agent-steps ``batch.next_pose_valid``, their count, and the mean distance of the most likely
        component's position to the target (m)."""
        if batch.next_pose is None or batch.next_pose_valid is None:
            from envs.errors import TrafficGymError

            raise TrafficGymError("A gmm_ego batch needs next_pose targets (training.bc_data.scene_sample with "
                                  "pose_targets=...).")
        logits, mean = self.mixture(self.batch_features(batch))
        sel = batch.next_pose_valid & batch.valid
        if not sel.any():
            return 0.0 * (logits.sum() + mean.sum()), 0, {"top1_error": 0.0}
        lg, mu, target = logits[sel], mean[sel], batch.next_pose[sel]
        nll = gmm_nll(lg, mu, target)
        best = mu[torch.arange(len(lg)), lg.argmax(-1)]
        err = (best[:, :2] - target[:, :2]).norm(dim=-1)
        return nll.sum(), int(sel.sum()), {"top1_error": float(err.detach().mean())}

    def config_json(self) -> dict:
        return {**self.cfg.to_json(), "components": self.components, "tol": self.tol}


def choose_component(logits: torch.Tensor, k: int, temperature: float, generator: torch.Generator | None
                     ) -> torch.Tensor:
    """One component per row of ``logits`` ``(N, K)``: a draw from ``softmax(logit / temperature)`` over the
    ``k`` most likely -> ``(N,)`` long."""
    top, idx = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
    pick = torch.multinomial(torch.softmax(top / temperature, dim=-1).cpu(), 1, generator=generator)
    return idx.gather(-1, pick.to(idx.device)).squeeze(-1)


def closest_component(mean: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, k: int = TOP_COMPONENTS
                      ) -> torch.Tensor:
    """CAT-K's choice for the ego: among the ``k`` most likely components (logits ``(N, K)``), the one whose mean
    position ``(N, K, 3)`` is closest to ``target`` ``(N, 3)`` (the logged pose, same frame) -> ``(N,)`` long."""
    idx = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    d = (mean.gather(1, idx[..., None].expand(-1, -1, 3))[..., :2] - target[:, None, :2]).norm(dim=-1)
    return idx.gather(-1, d.argmin(-1, keepdim=True)).squeeze(-1)


def _sinc(x: torch.Tensor) -> torch.Tensor:
    small = x.abs() < 1e-6
    return torch.where(small, torch.ones_like(x), torch.sin(x) / torch.where(small, torch.ones_like(x), x))


TRACKING = ("pose", "speed")  # how the bicycle follows a target pose (bicycle_toward)


def bicycle_toward(state: torch.Tensor, local: torch.Tensor, seconds: float, steps: int = TOKEN_STEPS,
                   tracking: str = "pose") -> torch.Tensor:
    """The constant bicycle action (acceleration m/s², curvature 1/m) that drives ``state`` ``(N, 5)`` in
    ``steps`` steps of ``seconds / steps`` to the pose ``local`` ``(N, 3)`` (given in the frame of ``state``),
    within the bicycle's bounds.

    The path is a circular arc with the target's heading change ``turn``: its length is ``chord / sinc(turn / 2)``,
    shortened by ``sinc(turn / (2 steps))`` because each bicycle step moves along its mean heading (a chord of its
    piece of arc); the acceleration covers that length from the current speed (distance = v0 t + a t² / 2), the
    curvature is ``turn / length``. Exact for targets the bicycle reaches at constant speed, and within
    centimetres otherwise (tested). Steering by the target's bearing instead (a pure-pursuit arc through its
    position) was measured worse on towns val: more collisions and twice the lateral acceleration for the
    behaviour-cloned policy, whose lateral offsets are noisier than its headings. A target behind the vehicle
    means stopping (the bicycle does not reverse).

    ``tracking="speed"`` instead ends the 0.5 s at the target's mean speed (``length / seconds``): it reaches the
    pose only when that is the current speed too, but a speed that disagrees with the target is corrected in one
    step instead of alternating above and below it, as hitting every pose exactly makes it do."""
    turn = wrap_angle(local[..., 2])
    chord = local[..., :2].norm(dim=-1)
    length = chord / _sinc(0.5 * turn).clamp(min=0.5) * _sinc(0.5 * turn / steps)
    length = torch.where(local[..., 0] > 0, length, torch.zeros_like(length))
    v0 = speed_along_heading(state).clamp(min=0)
    if tracking == "pose":
        accel = 2.0 * (length - v0 * seconds) / seconds ** 2
    elif tracking == "speed":
        accel = (length / seconds - v0) / seconds
    else:
        from envs.errors import UnknownNameError

        raise UnknownNameError("tracking", tracking, TRACKING)
    curvature = torch.where(length > 1e-3, turn / length.clamp(min=1e-3), torch.zeros_like(turn))
    low, high = InvertibleBicycle().bounds(state.device, state.dtype)
    return torch.stack([accel, curvature], dim=-1).clamp(low, high)


def reachable_target(state: torch.Tensor, local: torch.Tensor, dt: float, steps: int = TOKEN_STEPS) -> torch.Tensor:
    """The ego's CAT-K target: the pose that the kinematic bicycle reaches in ``steps`` steps of ``dt`` from
    ``state`` ``(N, 5)`` (x, y, heading, vx, vy) when it drives toward the logged pose ``local`` ``(N, 3)`` (in the
    frame of ``state``; ``bicycle_toward``, pose tracking, within the bicycle's bounds) -> ``(N, 3)`` in the same
    frame. Where the log is reachable this is the logged pose (to centimetres); where the rollout has fallen metres
    behind or off it, it is the most of the way back that 0.5 s of bounded acceleration and curvature allow, as
    the tokenized policy's corrective target is the vocabulary's token nearest to the log. Raw logged poses there
    are jumps no vehicle makes (measured: 18 m in 0.5 s behind a lagging rollout), and training toward them
    degraded the policy."""
    from envs.geometry import pose_in_frame

    if not len(state):
        return local.clone()
    action = bicycle_toward(state, local, steps * dt, steps=steps, tracking="pose")
    x, bicycle = state, InvertibleBicycle()
    for _ in range(steps):
        x = bicycle.forward(x, action, dt)
    return pose_in_frame(x[:, :3], state[:, :3])


@register_agent("gmm_ego")
class GmmEgoAgent(SmartAgent):
    """The Gaussian-mixture ego policy: drives the scene's ego (and only the ego) with the bicycle toward a
    component of its predicted pose 0.5 s ahead, replanning every 0.5 s.

    ``make_agent("gmm_ego", checkpoint=DIR/model.safetensors)`` (train one with ``trafficgym train bc --agent
    gmm_ego``) or a bundled name; ``top_k`` (3) components to choose among, ``temperature`` (1; 0.1: nearly the
    most likely) of the draw, ``tracking`` (``"speed"``, or ``"pose"``: see ``bicycle_toward``)."""

    dynamics = InvertibleBicycle()
    horizon = TOKEN_STEPS
    replan_every = TOKEN_STEPS

    def __init__(self, model: GmmEgoModel | None = None, top_k: int = TOP_COMPONENTS, temperature: float = 1.0,
                 tracking: str = "speed"):
        from envs.errors import CheckpointError

        if model is not None and not isinstance(model, GmmEgoModel):
            raise CheckpointError("gmm_ego needs a GmmEgoModel (the tokenized policy's model is the smart agent's).")
        if model is None:
            raise CheckpointError("The gmm_ego agent needs trained weights: make_agent('gmm_ego', checkpoint=PATH) "
                                  "(train one with `trafficgym train bc --agent gmm_ego`)"
                                  + (f", or one of the bundled {sorted(PRETRAINED)}." if PRETRAINED else "."))
        super().__init__(model, top_k=top_k, temperature=temperature)
        if tracking not in TRACKING:
            from envs.errors import UnknownNameError

            raise UnknownNameError("tracking", tracking, TRACKING)
        self.tracking = tracking

    @staticmethod
    def bundled_weights() -> dict:
        return PRETRAINED

    @staticmethod
    def model_from_config(cfg_json: dict, vocab: MotionVocabulary) -> GmmEgoModel:
        cfg_json = dict(cfg_json)
        components = int(cfg_json.pop("components"))
        return GmmEgoModel(SmartConfig(**cfg_json), vocab, components)

    def reset(self, state, mask, seed=None, slots=None):
        ego = torch.zeros_like(mask)
        rows = torch.arange(state.batch_size, device=mask.device)
        has_ego = state.ego >= 0
        ego[rows[has_ego], state.ego[has_ego]] = True
        if ((mask & state.agent_mask) & ~ego).any() or not (mask[ego]).all():
            from envs.errors import InvalidOptionError

            raise InvalidOptionError("gmm_ego is an ego policy: it drives the scene's ego and nothing else (use it "
                                     "with --setting ego / trafficgym/Ego-v0, and another agent for the others).")
        if (state.agent_type[ego] != int(AgentType.VEHICLE)).any():
            from envs.errors import InvalidOptionError

            raise InvalidOptionError("gmm_ego drives vehicles only; this scene's ego is not a vehicle.")
        super().reset(state, mask, seed, slots)

    def act(self, state, mask):
        return super(SmartAgent, self).act(state, mask)  # the plan's bicycle actions (the ego has no map exit)

    @torch.no_grad()
    def plan(self, state, mask):
        live = state.current_valid & state.agent_mask
        logits, mean = self._encode_now(state)
        out = torch.zeros(*mask.shape, self.horizon, 2, device=state.device, dtype=state.current.dtype)
        sel = mask & live
        if sel.any():
            local = self._target(logits[sel], mean[sel], state, sel)
            act = bicycle_toward(state.current[sel].float(), local.float(), TOKEN_STEPS * float(state.dt),
                                 tracking=self.tracking)
            out[sel] = act[:, None].to(out.dtype).expand(-1, self.horizon, -1)
        return out

    def _target(self, logits: torch.Tensor, mean: torch.Tensor, state, sel: torch.Tensor) -> torch.Tensor:
        """The pose ``(N, 3)`` (agent frame) each driven agent drives toward: its chosen component's mean."""
        comp = self._component(logits, mean, state, sel)
        return mean[torch.arange(len(comp)), comp]

    def _component(self, logits: torch.Tensor, mean: torch.Tensor, state, sel: torch.Tensor) -> torch.Tensor:
        """The component each driven agent follows (``(N,)`` from logits ``(N, K)`` and means ``(N, K, 3)``): a
        draw among the top ``top_k`` at ``temperature``."""
        return choose_component(logits, self.top_k, self.temperature, self.generator)


class GmmCatKRollout(GmmEgoAgent):
    """The ego's rollout in CAT-K fine-tuning (``training.catk``): every 0.5 s the ego takes, among its top-3
    components, the one whose mean is closest to its logged pose 0.5 s later (in the ego's frame); the most likely
    where the log is not valid then or the scene ends first. ``choice="topk"``: a draw among the top 3 at
    temperature 1 instead (the ablation without the log in the loop). It reads the future log, so it is a
    training device, not a registered agent. It lands on the chosen poses (``tracking="pose"``), so that choosing
    the component closest to the log keeps the rollout near the log, as CAT-K's rollout does (measured with speed
    tracking instead: the rollout lagged the log, the targets became corrections of metres the bicycle cannot
    make, and 300 steps degraded the policy, val ego minADE 3.29 -> 7.41 m)."""

    CHOICES = ("catk", "topk")

    def __init__(self, model: GmmEgoModel, top_k: int = TOP_COMPONENTS, choice: str = "catk",
                 tracking: str = "pose"):
        super().__init__(model, top_k=top_k, temperature=1.0, tracking=tracking)
        if choice not in self.CHOICES:
            from envs.errors import UnknownNameError

            raise UnknownNameError("CAT-K rollout choice", choice, self.CHOICES)
        self.choice = choice

    def _component(self, logits, mean, state, sel):
        if self.choice == "topk":
            return super()._component(logits, mean, state, sel)
        from envs.geometry import pose_in_frame

        log_next, ok = logged_pose_ahead(state)
        target = pose_in_frame(log_next[sel].float(), state.current[..., :3][sel].float())
        return torch.where(ok[sel], closest_component(mean, logits, target, self.top_k), logits.argmax(-1))
