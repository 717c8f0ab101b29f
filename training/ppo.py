"""PPO fine-tuning of the Gaussian-mixture ego policy: ``trafficgym train ppo --policy gmm_ego --init towns-gmm-catk``.

CleanRL-style PPO (Schulman et al., arXiv 1707.06347) written out, because the policy is a set-attention model over
the whole scene that no RL library wraps. One iteration:

1. **Rollout.** ``scenes`` train scenes (this process's share under ``torchrun``) run from the env's first
   controlled step to the end of their log in one batched ``trafficgym/Ego-v0`` engine: the ego env's own dynamics,
   reward, termination (a collision or leaving the road ends the episode) and traffic (``log``, ``idm``,
   ``smart``). Every 0.5 s the policy makes one *decision*: it draws one of the top-``top_k`` mixture components
   (the softmax of their logits) and a pose around that component's mean (Gaussian exploration noise of
   ``pose_std``; 0 gives the mean), and the ego drives toward that pose for the next 5 steps with the kinematic
   bicycle, as the ``gmm_ego`` agent does (``agents.gmm_ego.bicycle_toward``). The decision's reward is the env
   reward of those steps, discounted within the decision.
2. **Scoring.** One teacher-forced pass of the model over the finished rollouts (the decoder is causal in time, so
   it gives at every decision what the rollout's incremental steps gave, as CAT-K's fine-tuning uses it) gives the
   log-probability of each decision, the value (a small head on the ego's decoder feature) and the initial
   policy's mixture. Advantages by GAE over decisions: an episode that *terminated* has no value after its end; one
   *truncated* at the end of its log is bootstrapped with the value of its final state.
3. **Update.** ``epochs`` passes over the rollout in ``minibatches`` groups of scenes: the clipped surrogate, the
   value loss, an entropy bonus and a penalty ``kl_coef`` times the KL divergence of the policy's mixture from the
   initial one (``kl_to_init``), which keeps it driving like the human it imitated while it learns to avoid
   collisions and leaving the road. The trainer is ``training.trainer.Trainer``: AdamW with cosine decay,
   checkpoints, TensorBoard, and ``DistributedDataParallel`` under ``torchrun`` (each process rolls out its
   own scenes; the gradients are averaged).

Files: ``DIR/model.safetensors`` is a ``gmm_ego`` checkpoint (``make_agent("gmm_ego", checkpoint=...)``);
``DIR/last.safetensors`` the policy with its value head and the optimizer, for ``--resume``; ``DIR/ppo.json`` the
run's options; ``DIR/val.jsonl`` the periodic validation on val scenes (return, collision, off-road, progress,
length: the env's own reward, the ``gmm_ego`` agent as evaluation drives it).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from agents.gmm_ego import GMM_STD, GmmEgoAgent, GmmEgoModel
from agents.smart.tokenizer import TOKEN_STEPS
from envs.errors import CheckpointError, TrafficGymError, UnknownNameError
from envs.geometry import wrap_angle
from training.trainer import Callback, TrainConfig, Trainer, Validation, rank_and_world

TRAFFIC = ("log", "idm", "smart")
RUN_FILE = "ppo.json"


@dataclass(frozen=True)
class GmmPpoConfig:
    """PPO options of the ego policy (validated on construction). Defaults chosen on towns train / val."""

    iterations: int = 150  # rollouts in all
    scenes: int = 16  # scenes per rollout, over all processes
    epochs: int = 2  # passes over each rollout
    minibatches: int = 2  # gradient steps per pass (groups of scenes)
    lr: float = 5e-5
    final_lr_fraction: float = 0.1
    value_lr_scale: float = 20.0  # the value head (trained from scratch) learns this many times faster
    value_warmup: int = 5  # first iterations train the value head only (the policy's loss weighted 0)
    gamma: float = 0.99  # per env step
    gae_lambda: float = 0.95  # per decision
    clip: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    kl_coef: float = 0.1
    top_k: int = 3
    pose_std: tuple[float, float, float] = (0.5, 0.5, 0.05)  # exploration noise of the pose: x, y (m), heading
    tracking: str = "speed"
    traffic: str = "log"
    progress_reward: float = 0.1  # the training reward per metre of progress (the env's)
    collision_penalty: float = -20.0  # the training reward (the env's: -5 each; validation scores the env's)
    offroad_penalty: float = -20.0
    terminate: bool = True  # training episodes end at a collision / leaving the road (validation's always do)
    frozen: str = "catk"  # what stays frozen (training.catk.TRAINABLE)
    grad_clip: float = 0.5
    val_every: int = 25  # iterations between validations (0: only at the end)
    val_scenes: int = 32
    seed: int = 0

    def __post_init__(self):
        from training.catk import TRAINABLE

        for name in ("iterations", "scenes", "epochs", "minibatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GmmPpoConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.minibatches > self.scenes:
            raise ValueError(f"minibatches ({self.minibatches}) cannot exceed the scenes per rollout ({self.scenes}).")
        if self.traffic not in TRAFFIC:
            raise UnknownNameError("traffic", self.traffic, TRAFFIC)
        if self.frozen not in TRAINABLE:
            raise UnknownNameError("frozen set", self.frozen, TRAINABLE)
        if len(self.pose_std) != 3 or any(not s >= 0 for s in self.pose_std):
            raise ValueError(f"pose_std must be 3 numbers >= 0 (x m, y m, heading rad), got {self.pose_std!r}.")
        for name in ("lr", "value_lr_scale", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GmmPpoConfig.{name} must be > 0, got {getattr(self, name)!r}.")
        for name in ("ent_coef", "vf_coef", "kl_coef", "clip", "value_warmup", "val_every"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"GmmPpoConfig.{name} must be >= 0, got {getattr(self, name)!r}.")
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gamma must be in (0, 1] and gae_lambda in [0, 1], got {self.gamma}, {self.gae_lambda}.")

    @property
    def max_steps(self) -> int:
        """Gradient steps in all."""
        return self.iterations * self.epochs * self.minibatches

    def to_json(self) -> dict:
        out = asdict(self)
        out["pose_std"] = list(self.pose_std)
        return out


# ---- the policy's distribution --------------------------------------------------------------------------------

def _kl_scale(pose_std: tuple[float, ...]) -> torch.Tensor:
    """Per-dimension scale of the pose part of the KL: the exploration std, or the mixture's own std (1 m, 1 m,
    0.1 rad) where there is no exploration noise."""
    own = (GMM_STD[0], GMM_STD[1], GMM_STD[2])
    return torch.tensor([s if s > 0 else o for s, o in zip(pose_std, own, strict=True)])


def action_log_prob(logits: torch.Tensor, mean: torch.Tensor, allowed: torch.Tensor, comp: torch.Tensor,
                    pose: torch.Tensor, pose_std: tuple[float, ...]) -> torch.Tensor:
    """Log-probability of decisions ``(N,)``: component ``comp`` ``(N,)`` drawn from the softmax of ``logits``
    ``(N, K)`` over the ``allowed`` ``(N, K)`` components (the top-k at the time), then the pose ``pose`` ``(N, 3)``
    (x, y, heading in the ego's frame) from independent Gaussians of std ``pose_std`` around that component's mean
    (``mean`` ``(N, K, 3)``; the heading difference wrapped). Dimensions of std 0 are not sampled (the pose is
    the mean there) and add nothing."""
    logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    out = logp.gather(-1, comp[:, None]).squeeze(-1)
    std = torch.as_tensor(pose_std, dtype=mean.dtype, device=mean.device)
    noisy = std > 0
    if noisy.any():
        mu = mean[torch.arange(len(comp), device=mean.device), comp]
        d = pose - mu
        d = torch.cat([d[:, :2], wrap_angle(d[:, 2:3])], dim=-1)[:, noisy]
        s = std[noisy]
        out = out + (-0.5 * (d / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)
    return out


def masked_entropy(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Entropy ``(N,)`` of the component draw (softmax over the ``allowed`` components)."""
    logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return -(logp.exp() * logp.masked_fill(~allowed, 0.0)).sum(-1)


def kl_to_init(logits: torch.Tensor, mean: torch.Tensor, init_logits: torch.Tensor, init_mean: torch.Tensor,
               pose_std: tuple[float, ...]) -> torch.Tensor:
    """KL divergence ``(N,)`` of the policy's mixture from the initial policy's, over the joint of component and
    pose: ``KL(p || p0) + sum_k p_k * KL(N(mean_k) || N(mean0_k))`` over all components (logits ``(N, K)``,
    means ``(N, K, 3)``), each Gaussian with the per-dimension std of ``_kl_scale(pose_std)`` (the exploration
    noise, or the mixture's own std where there is none), so the Gaussian term is half the squared scaled distance
    of the means (heading wrapped). It bounds the KL of the pose distributions from above (chain rule)."""
    logp, logp0 = torch.log_softmax(logits, dim=-1), torch.log_softmax(init_logits, dim=-1)
    p = logp.exp()
    kl_comp = (p * (logp - logp0)).sum(-1)
    d = mean - init_mean
    d = torch.cat([d[..., :2], wrap_angle(d[..., 2:3])], dim=-1) / _kl_scale(pose_std).to(mean)
    return kl_comp + (p * 0.5 * (d ** 2).sum(-1)).sum(-1)


def gae(rewards: np.ndarray, values: np.ndarray, length: np.ndarray, terminated: np.ndarray,
        last_value: np.ndarray, discount: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimates of whole episodes, one per row: ``rewards``, ``values`` and ``discount``
    ``(E, L)`` per decision (padding past ``length`` ignored; ``discount[e, k]`` is the discount from decision k's
    state to the next one's, gamma to the number of env steps between them), ``terminated`` ``(E,)`` whether the
    episode ended by termination (nothing after it) rather than by truncation at the end of its log, in which case
    ``last_value`` ``(E,)``, the value of its final state, is what follows. Returns advantages and returns
    (advantage + value) ``(E, L)``, 0 in the padding."""
    e, n = rewards.shape
    adv = np.zeros((e, n))
    for i in range(e):
        nxt_value = 0.0 if terminated[i] else float(last_value[i])
        running = 0.0
        for k in range(int(length[i]) - 1, -1, -1):
            delta = rewards[i, k] + discount[i, k] * nxt_value - values[i, k]
            running = delta + discount[i, k] * lam * running
            adv[i, k] = running
            nxt_value = values[i, k]
    ret = np.where(np.arange(n)[None] < length[:, None], adv + values, 0.0)
    return adv, ret


# ---- the rollout -------------------------------------------------------------------------------------------------

class GmmPpoRollout(GmmEgoAgent):
    """The ego policy as PPO's rollouts drive it: a draw among the top-``top_k`` components (temperature 1), then a
    pose around the chosen mean (``pose_std``), from one generator per batch row (``row_seeds``), so that a scene's
    draws do not depend on which other scenes share its batch (N processes roll out what one process would). Each
    decision is recorded (``records``); rows not ``active`` (their episode ended) make none. A training device,
    not a registered agent."""

    def __init__(self, model: GmmEgoModel, top_k: int, pose_std: tuple[float, ...], tracking: str = "speed"):
        super().__init__(model, top_k=top_k, temperature=1.0, tracking=tracking)
        self.pose_std = torch.as_tensor(pose_std, dtype=torch.float32)
        self.records: list[dict] = []
        self.active: torch.Tensor | None = None
        self.row_generators: list[torch.Generator] = []

    def seed_rows(self, seeds: list[int]) -> None:
        self.row_generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.records = []

    def _target(self, logits, mean, state, sel):
        """Rows replanning now in an active episode draw (and record) a decision; the others' poses are not used."""
        stale = (self._age >= self.replan_every).to(state.device)
        active = torch.ones_like(stale) if self.active is None else self.active.to(state.device)
        rows_all, _ = sel.nonzero(as_tuple=True)
        drawn = (stale & active)[rows_all]
        lg_all, mu_all = logits.float(), mean.float()
        local = mu_all[torch.arange(len(lg_all)), lg_all.argmax(-1)]
        if not drawn.any():
            return local
        rows, lg, mu = rows_all[drawn], lg_all[drawn], mu_all[drawn]
        k = min(self.top_k, lg.shape[-1])
        allowed = torch.zeros_like(lg, dtype=torch.bool).scatter_(-1, lg.topk(k, dim=-1).indices, True)
        probs = torch.softmax(lg.masked_fill(~allowed, float("-inf")), dim=-1)
        u = torch.stack([torch.rand(1, generator=self.row_generators[int(b)]) for b in rows.cpu()]).squeeze(-1)
        noise = torch.stack([torch.randn(3, generator=self.row_generators[int(b)]) for b in rows.cpu()])
        cdf = probs.cumsum(-1)
        comp = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).clamp(max=1 - 1e-7)[:, None]).squeeze(-1)
        comp = comp.clamp(max=lg.shape[-1] - 1)
        comp = torch.where(allowed.gather(-1, comp[:, None]).squeeze(-1), comp, lg.argmax(-1))
        pose = mu[torch.arange(len(comp)), comp] + noise.to(mu) * self.pose_std.to(mu)
        local[drawn] = pose
        self.records.append({"rows": rows.cpu(), "t": state.t[rows].cpu(), "comp": comp.cpu(),
                             "allowed": allowed.cpu(), "pose": pose.cpu(), "logits": lg.cpu()})
        return local


class _EngineView:
    """What ``AgentPolicy`` reads of an env: ``unwrapped.engine``."""

    def __init__(self, engine):
        self.engine = engine
        self.unwrapped = self


@dataclass
class Rollout:
    """This process's finished rollout: one teacher-forcing sample per scene and its decisions."""

    samples: list  # training.bc_data.TokenSample per scene (boundaries through the final step)
    ego: np.ndarray  # (B,) the ego's agent index
    row: np.ndarray  # (N,) scene of each decision
    step: np.ndarray  # (N,) its boundary (env step / 5)
    comp: np.ndarray  # (N,)
    allowed: np.ndarray  # (N, K) bool
    pose: np.ndarray  # (N, 3)
    reward: np.ndarray  # (B, L) per decision, discounted within it
    discount: np.ndarray  # (B, L) to the next decision
    length: np.ndarray  # (B,) decisions per episode
    terminated: np.ndarray  # (B,)
    final_step: np.ndarray  # (B,) boundary of the final state (for the bootstrap of truncated episodes)
    episodes: dict  # (B,) arrays: return, length, collision, offroad, progress (the env's episode_stats)


def collect(engine, agent: GmmPpoRollout, positions: list[int], seeds: list[int], gamma: float,
            traffic_seed: int = 0) -> Rollout:
    """Roll the scenes at ``positions`` (indices into ``engine.scene_indices``, one per engine slot) out to their
    ends with ``agent`` driving the ego; returns the decisions and their rewards (see ``Rollout``)."""
    from agents.env_policy import AgentPolicy
    from training.bc_data import token_sample
    from training.catk import _rollout_inputs, _rollout_m2a

    b = engine.num_slots
    engine.reset_slots(np.arange(b), np.asarray(positions), seed=traffic_seed)
    agent.seed_rows(seeds)
    policy = AgentPolicy(_EngineView(engine), agent)
    start = int(engine.cfg.start_step)
    horizon = (engine.num_steps - 1 - start) // TOKEN_STEPS + 1
    reward = np.zeros((b, horizon))
    discount = np.zeros((b, horizon))
    decisions = np.zeros(b, np.int64)
    in_decision = np.zeros(b, np.int64)  # env steps taken since the current decision
    terminated = np.zeros(b, bool)
    episodes = {k: np.zeros(b) for k in ("return", "length", "collision", "offroad", "progress")}
    n_rec = 0
    while not engine.done.all():
        active = ~engine.done
        agent.active = torch.as_tensor(active)
        action = policy()
        for rec in agent.records[n_rec:]:
            for r in rec["rows"].numpy():
                decisions[r] += 1
                in_decision[r] = 0
        n_rec = len(agent.records)
        step_reward, term, trunc, infos = engine.step(action, active=active)
        k = decisions - 1
        for r in np.flatnonzero(active):
            reward[r, k[r]] += gamma ** in_decision[r] * step_reward[r]
            in_decision[r] += 1
            discount[r, k[r]] = gamma ** in_decision[r]
            if term[r] or trunc[r]:
                terminated[r] = bool(term[r])
                for key in episodes:
                    episodes[key][r] = infos[r]["episode_stats"][key]
    st = engine.state
    samples, egos = [], np.zeros(b, np.int64)
    final_step = np.zeros(b, np.int64)
    for r in range(b):
        scene = engine.dataset[engine.scene_indices[int(positions[r])]]
        pose, ok, in_token = _rollout_inputs(agent.model, scene, st, r, None, None, final=True)
        sample = token_sample(scene, pose.numpy(), ok.numpy(), in_token.numpy(),
                              np.full(ok.shape, -1, np.int64), agent.model.cfg,
                              m2a=_rollout_m2a(scene.map, pose, agent.model.cfg))
        samples.append(sample)
        egos[r] = int(st.ego[r])
        final_step[r] = min(int(st.t[r]) // TOKEN_STEPS, ok.shape[1] - 1)
    rec = agent.records
    cat = (lambda key: torch.cat([x[key] for x in rec]).numpy()) if rec else (lambda key: np.zeros(0))
    rows = cat("rows").astype(np.int64)
    return Rollout(samples=samples, ego=egos, row=rows, step=(cat("t") // TOKEN_STEPS).astype(np.int64),
                   comp=cat("comp").astype(np.int64), allowed=cat("allowed").astype(bool),
                   pose=cat("pose").astype(np.float32), reward=reward, discount=discount, length=decisions,
                   terminated=terminated, final_step=final_step, episodes=episodes)


# ---- the model and its loss ------------------------------------------------------------------------------------

@dataclass
class PpoBatch:
    """A minibatch: the scenes' teacher-forcing batch and their decisions (``N``), with the rollout's scores."""

    tokens: object  # agents.smart.model.TokenBatch
    row: torch.Tensor  # (N,) scene in the batch
    agent: torch.Tensor  # (N,) the ego's agent index
    step: torch.Tensor  # (N,) boundary
    comp: torch.Tensor
    allowed: torch.Tensor
    pose: torch.Tensor
    old_logp: torch.Tensor
    advantage: torch.Tensor
    ret: torch.Tensor
    init_logits: torch.Tensor  # (N, K) the initial policy's mixture at the decision
    init_mean: torch.Tensor  # (N, K, 3)
    policy_weight: float = 1.0  # 0 while the value head warms up
    stats: dict = field(default_factory=dict)  # the rollout's episode statistics (logged)

    def to(self, device):
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        moved["tokens"] = self.tokens.to(device)
        return replace(self, **moved)


class GmmPpo(nn.Module):
    """The trained module: the ego policy (``policy``, a ``GmmEgoModel``) and a value head on its decoder feature
    of the ego (detached: the value loss does not move the policy's backbone). ``loss(batch)`` is PPO's."""

    def __init__(self, policy: GmmEgoModel, cfg: GmmPpoConfig):
        super().__init__()
        self.policy, self.cfg = policy, cfg
        d = policy.cfg.hidden
        self.value = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 1))

    def checkpoint_extra(self) -> dict:
        """Metadata of the training state: whose weights it holds (so loading it as an agent names the right file)."""
        return {"weights_of": "gmm_ego", "ppo": self.cfg.to_json()}

    def lr_scales(self) -> dict[str, float]:
        """Parameter-name prefix -> learning-rate multiplier (``Trainer``)."""
        return {"value.": self.cfg.value_lr_scale}

    def score(self, tokens, row, agent, step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mixture logits ``(N, K)``, means ``(N, K, 3)`` and values ``(N,)`` at the given agent-steps."""
        x = self.policy.batch_features(tokens)[row, agent, step]
        logits, mean = self.policy.mixture(x)
        return logits, mean, self.value(x.detach()).squeeze(-1)

    def loss(self, batch: PpoBatch) -> tuple[torch.Tensor, int, dict]:
        cfg = self.cfg
        logits, mean, value = self.score(batch.tokens, batch.row, batch.agent, batch.step)
        logp = action_log_prob(logits, mean, batch.allowed, batch.comp, batch.pose, cfg.pose_std)
        ratio = torch.exp(logp - batch.old_logp)
        adv = batch.advantage
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
        entropy = masked_entropy(logits, batch.allowed)
        kl = kl_to_init(logits, mean, batch.init_logits, batch.init_mean, cfg.pose_std)
        value_loss = 0.5 * (value - batch.ret) ** 2
        policy_loss = -surrogate - cfg.ent_coef * entropy + cfg.kl_coef * kl
        loss = batch.policy_weight * policy_loss + cfg.vf_coef * value_loss
        n = len(adv)
        with torch.no_grad():
            clipped = ((ratio - 1).abs() > cfg.clip).float().mean() if n else torch.zeros(())
            approx_kl = ((ratio - 1) - (logp - batch.old_logp)).mean() if n else torch.zeros(())
        metrics = {"policy_loss": float(-surrogate.detach().mean()) if n else 0.0,
                   "value_loss": float(value_loss.detach().mean()) if n else 0.0,
                   "entropy": float(entropy.detach().mean()) if n else 0.0,
                   "kl_to_init": float(kl.detach().mean()) if n else 0.0,
                   "clip_fraction": float(clipped), "approx_kl": float(approx_kl), **batch.stats}
        return loss.sum(), n, metrics


# ---- the data: rollouts turned into minibatches -----------------------------------------------------------------

class PpoRollouts:
    """The trainer's data: an endless iterable that, every ``epochs * minibatches`` steps, rolls this process's
    share of the next ``scenes`` train scenes out with the current policy, scores it and yields its minibatches."""

    def __init__(self, module: GmmPpo, engine, cfg: GmmPpoConfig, positions: list[int]):
        self.module, self.engine, self.cfg = module, engine, cfg
        self.positions = positions  # the usable scenes (indices into engine.scene_indices)
        self.rank, self.world = rank_and_world()
        if cfg.scenes % self.world:
            raise ValueError(f"scenes per rollout ({cfg.scenes}) must be divisible by the {self.world} processes.")
        if cfg.scenes // self.world < cfg.minibatches:
            raise ValueError(f"each process rolls out {cfg.scenes // self.world} scenes, fewer than the "
                             f"{cfg.minibatches} minibatches.")
        self.init = copy.deepcopy(module.policy).eval()
        for p in self.init.parameters():
            p.requires_grad_(False)
        self.agent = GmmPpoRollout(module.policy, cfg.top_k, cfg.pose_std, cfg.tracking)
        self.iteration = 0
        self.env_steps = 0  # over all processes, since the start of the run
        self.last_stats: dict = {}

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "env_steps": self.env_steps}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.env_steps = int(state.get("env_steps", 0))

    def _scene_order(self, iteration: int) -> list[int]:
        per_epoch = max(len(self.positions) // self.cfg.scenes, 1)
        epoch, k = divmod(iteration, per_epoch)
        perm = np.random.default_rng(self.cfg.seed + epoch).permutation(len(self.positions))
        picked = [self.positions[int(i)] for i in perm[k * self.cfg.scenes:(k + 1) * self.cfg.scenes]]
        while len(picked) < self.cfg.scenes:  # fewer scenes than a rollout: repeat them
            picked += picked[:self.cfg.scenes - len(picked)]
        return picked

    def __iter__(self):
        while True:
            yield from self._iteration()

    def _iteration(self):
        from training.bc_data import collate

        cfg, module = self.cfg, self.module
        it = self.iteration
        picked = self._scene_order(it)
        mine = list(range(self.rank, cfg.scenes, self.world))
        seeds = [cfg.seed * 1_000_003 + it * 7919 + g for g in mine]
        was_training = module.training
        module.eval()
        roll = collect(self.engine, self.agent, [picked[g] for g in mine], seeds, cfg.gamma,
                       traffic_seed=cfg.seed + it)
        tokens = collate(roll.samples)
        with torch.no_grad():
            row, agent, step = (torch.as_tensor(roll.row), torch.as_tensor(roll.ego[roll.row]),
                                torch.as_tensor(roll.step))
            x = module.policy.batch_features(tokens)
            logits, mean = module.policy.mixture(x[row, agent, step])
            values = module.value(x[row, agent, step]).squeeze(-1)
            b = len(roll.samples)
            last = module.value(x[torch.arange(b), torch.as_tensor(roll.ego),
                                  torch.as_tensor(roll.final_step)]).squeeze(-1).numpy()
            init_x = self.init.batch_features(tokens)[row, agent, step]
            init_logits, init_mean = self.init.mixture(init_x)
            old_logp = action_log_prob(logits, mean, torch.as_tensor(roll.allowed), torch.as_tensor(roll.comp),
                                       torch.as_tensor(roll.pose), cfg.pose_std)
        module.train(was_training)
        # per-episode arrays of the decisions (they are recorded in time order per scene)
        horizon = roll.reward.shape[1]
        v = np.zeros((b, horizon))
        index = np.zeros(len(roll.row), np.int64)
        counts = np.zeros(b, np.int64)
        for n, r in enumerate(roll.row):
            index[n] = counts[r]
            counts[r] += 1
        v[roll.row, index] = values.numpy()
        adv, ret = gae(roll.reward, v, roll.length, roll.terminated, last, roll.discount, cfg.gae_lambda)
        adv_n, ret_n = adv[roll.row, index], ret[roll.row, index]
        adv_n = self._normalise(adv_n)
        stats = self._episode_stats(roll)
        self.env_steps += int(round(stats["episode_length"] * cfg.scenes))
        stats["env_steps"] = float(self.env_steps)
        self.last_stats = stats
        weight = 0.0 if it < cfg.value_warmup else 1.0
        rng = np.random.default_rng(cfg.seed * 31 + it)
        for _ in range(cfg.epochs):
            order = rng.permutation(b)
            for group in np.array_split(order, cfg.minibatches):
                group = np.sort(group)
                where = {int(r): i for i, r in enumerate(group)}
                sel = np.flatnonzero(np.isin(roll.row, group))
                yield PpoBatch(
                    tokens=collate([roll.samples[int(r)] for r in group]),
                    row=torch.as_tensor([where[int(r)] for r in roll.row[sel]], dtype=torch.long),
                    agent=torch.as_tensor(roll.ego[roll.row[sel]]), step=torch.as_tensor(roll.step[sel]),
                    comp=torch.as_tensor(roll.comp[sel]), allowed=torch.as_tensor(roll.allowed[sel]),
                    pose=torch.as_tensor(roll.pose[sel]), old_logp=old_logp[sel],
                    advantage=torch.as_tensor(adv_n[sel], dtype=torch.float32),
                    ret=torch.as_tensor(ret_n[sel], dtype=torch.float32), init_logits=init_logits[sel],
                    init_mean=init_mean[sel], policy_weight=weight, stats=stats)
        self.iteration += 1

    def _normalise(self, adv: np.ndarray) -> np.ndarray:
        """Advantages standardised over the global rollout (all processes)."""
        s = torch.tensor([len(adv), adv.sum(), (adv ** 2).sum()], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(s)
        n, mean = max(float(s[0]), 1.0), float(s[1]) / max(float(s[0]), 1.0)
        std = math.sqrt(max(float(s[2]) / n - mean ** 2, 0.0))
        return (adv - mean) / (std + 1e-8)

    def _episode_stats(self, roll: Rollout) -> dict:
        """Means over the global rollout's episodes (reported by the trainer as ``episode_*``)."""
        keys = ("return", "collision", "offroad", "progress", "length")
        s = torch.tensor([len(roll.length)] + [float(roll.episodes[k].sum()) for k in keys], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(s)
        return {f"episode_{k}": float(s[i + 1] / s[0]) for i, k in enumerate(keys)}


# ---- the run -----------------------------------------------------------------------------------------------------

def save_gmm_ppo(module: GmmPpo) -> tuple[str, dict]:
    return "gmm_ego_ppo", module.policy.config_json()  # the training state; DIR/model.safetensors is gmm_ego


def load_init(init: str) -> GmmEgoModel:
    """The ``GmmEgoModel`` of a ``gmm_ego`` checkpoint or bundled name (``CheckpointError`` for another agent's)."""
    from agents.registry import make_agent

    agent = make_agent("gmm_ego", checkpoint=init)
    return agent.model


def ppo_validation(cfg: GmmPpoConfig, data: dict, scenes: int, split: str = "val"):
    """``fn(module) -> dict``: the ``gmm_ego`` agent of the module's policy (as evaluation drives it: top-3 at
    temperature 1, no pose noise) in ``scenes`` val scenes of the ego env, the env's own reward."""
    from training.ego_episodes import ego_episodes, summarize
    from training.sb3_ppo import _traffic

    def validate(module: GmmPpo) -> dict:
        agent = GmmEgoAgent(copy.deepcopy(module.policy).eval(), top_k=cfg.top_k, tracking=cfg.tracking)
        stats = summarize(ego_episodes(agent, scenes=scenes, seed=cfg.seed, split=split,
                                       traffic=_traffic(cfg.traffic), **data))
        return {k: stats[k] for k in ("return", "collision", "offroad", "progress", "length")}

    return validate


class _ValidationFromStart(Validation):
    """``Validation`` that also scores the initial weights before the first update (a fresh run only)."""

    def on_train_start(self, trainer) -> None:
        if trainer.step == 0:
            self._run(trainer)


class _NanGuard(Callback):
    """Stops with ``TrainingDivergedError`` (the step, the last good checkpoint) when the loss turns NaN."""

    def on_step_end(self, trainer, out):
        from training.sb3_ppo import TrainingDivergedError

        if not math.isfinite(out["loss"]):
            last = Path(trainer.cfg.out) / "last.safetensors"
            raise TrainingDivergedError(
                f"PPO diverged at step {trainer.step}: the loss is {out['loss']}. The last good checkpoint is "
                f"{last if last.exists() else '(none saved yet)'}; resume from it with a lower --lr.")


def train_gmm_ppo(out: str | Path, cfg: GmmPpoConfig, init: str, data: dict | None = None, split: str = "train",
                  val_split: str = "val", resume: bool = False, progress: bool = True, scenes: int | None = None,
                  validate: bool = True, ckpt_every: int = 0, callbacks=()) -> tuple[GmmPpo, list[dict]]:
    """PPO fine-tuning of the ``gmm_ego`` weights ``init`` (a checkpoint or bundled name) in the ego env; see the
    module docstring. ``scenes``: only the first N scenes of the split; ``callbacks``: more
    ``training.trainer.Callback`` objects. Returns the module and the history."""
    import gymnasium as gym

    import envs  # noqa: F401
    from envs.rewards import RewardConfig
    from training.catk import freeze
    from training.sb3_ppo import _traffic

    data = dict(data or {})
    out = Path(out)
    if resume and not (out / RUN_FILE).exists():
        raise CheckpointError(f"--resume: {out} is not a gmm_ego PPO run (no {RUN_FILE}).")
    policy = load_init(init)
    torch.manual_seed(cfg.seed)
    module = GmmPpo(policy, cfg)
    freeze(policy, cfg.frozen)
    reward = RewardConfig(progress=cfg.progress_reward, collision=cfg.collision_penalty,
                          offroad=cfg.offroad_penalty)
    rank, world = rank_and_world()
    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=cfg.scenes // world, vectorization_mode="vector_entry_point",
                        split=split, traffic=_traffic(cfg.traffic), reward=reward, dynamics="bicycle",
                        terminate_on_collision=cfg.terminate, terminate_on_offroad=cfg.terminate, **data)
    engine = venv.unwrapped.engine
    n = len(engine.scene_indices) if scenes is None else min(scenes, len(engine.scene_indices))
    if n == 0:
        raise TrafficGymError(f"The {split} split has no scene with an ego.")
    rollouts = PpoRollouts(module, engine, cfg, list(range(n)))
    if not resume and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps({"init": str(init), "split_scenes": n, **cfg.to_json()}, indent=1))
    tcfg = TrainConfig(out=str(out), max_steps=cfg.max_steps, batch_size=cfg.scenes, lr=cfg.lr,
                       final_lr_fraction=cfg.final_lr_fraction, grad_clip=cfg.grad_clip, seed=cfg.seed,
                       resume=resume, progress=progress, ckpt_every=ckpt_every, weight_decay=0.0,
                       log_every=cfg.epochs * cfg.minibatches)
    callbacks = [_NanGuard(), *callbacks]
    if validate:
        every = cfg.val_every * cfg.epochs * cfg.minibatches
        score = ppo_validation(cfg, data, cfg.val_scenes, val_split)
        callbacks.append(_ValidationFromStart(lambda m: {**score(m), "env_steps": rollouts.env_steps}, every))
    trainer = Trainer(module, rollouts, tcfg, save_fn=save_gmm_ppo, callbacks=callbacks)
    history = trainer.fit()
    if rank == 0:
        from agents.checkpoint import save_checkpoint

        save_checkpoint(out / "model.safetensors", "gmm_ego", policy.config_json(), dict(policy.state_dict()),
                        extra={"ppo": cfg.to_json(), "init": str(init), "step": trainer.step})
    venv.close()
    return module, history
