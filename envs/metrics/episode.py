"""Episode metrics: evaluate R closed-loop rollouts of one scene against its log.

``Rollouts`` is the one input every episode metric takes; ``EPISODE_METRICS`` is the registry
(``register_episode_metric``), and ``compute_episode_metrics`` runs a chosen set. The metric families live in
their own modules (``realism.py``: WOSAC-style likelihoods and minADE; ``blm.py``: BLM's safety / diversity
set; ``planning.py``: ego planning metrics) and register themselves here.

Conventions: 10 Hz is not assumed (``dt`` is carried); the first ``history_steps`` steps are the logged
history shared by every rollout; metrics are computed on the future steps unless a metric says otherwise.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from envs.errors import TrafficGymError, UnknownNameError
from envs.metrics.kernels import all_finite_where_valid
from envs.metrics.traffic_lights import TrafficLights

HISTORY_TOLERANCE = 0.01  # m: sim and log must agree at the last history step (they are the same data)


class RolloutError(TrafficGymError, ValueError):
    """Rollouts with wrong shapes, NaNs, mismatched agent ids, or too few samples for a metric."""


_VALIDATED: weakref.WeakSet = weakref.WeakSet()


@dataclass(frozen=True, eq=False)
class Rollouts:
    """R simulated futures of one scene, plus its log. Torch tensors (any device), float32 unless noted.

    Attributes:
        scene_id: the scene.
        agent_ids: ``(A,)`` str ids of the evaluated agents (the log's ids, same order as every tensor below).
        agent_type: ``(A,)`` long ``AgentType``; extent ``(A, 2)`` length, width (m).
        sim: ``(R, A, T, 5)`` simulated x, y, heading, vx, vy over the whole scene (steps ``< history_steps``
            equal the log); sim_valid ``(R, A, T)`` bool.
        log: ``(A, T, 5)`` logged states; log_valid ``(A, T)`` bool.
        history_steps: number of leading logged steps (WOSAC: 11, i.e. steps 0..10).
        dt: seconds per step.
        map_index: the scene's ``envs.map_index.MapIndex`` (road-edge signed distance field), or None.
        ego_index: index of the ego among the agents (-1: none).
        context: optional ``(A2, T, 5)`` states of other agents in the scene (not evaluated, e.g. log-replayed),
            with ``context_valid`` ``(A2, T)`` and ``context_extent`` ``(A2, 2)``, for interaction features.
        traffic_lights: the scene's signals (``envs.metrics.traffic_lights.TrafficLights``), or None.
        scored: optional ``(A,)`` bool, the agents the realism likelihoods and displacement errors score (None:
            every evaluated agent). The ego setting scores the ego alone while the others stay simulated agents
            (interaction partners with their own rollouts).

    Invalid steps may hold anything finite (the simulator and the datasets store zeros); like the official WOSAC
    code, the realism features difference the stored values where the logged history is invalid.
    """

    scene_id: str
    agent_ids: np.ndarray
    agent_type: torch.Tensor
    extent: torch.Tensor
    sim: torch.Tensor
    sim_valid: torch.Tensor
    log: torch.Tensor
    log_valid: torch.Tensor
    history_steps: int
    dt: float
    map_index: object = None
    ego_index: int = -1
    context: torch.Tensor | None = None
    context_valid: torch.Tensor | None = None
    context_extent: torch.Tensor | None = None
    traffic_lights: object = None
    scored: torch.Tensor | None = None

    @property
    def wosac_objects(self) -> torch.Tensor:
        """``(A,)`` bool: the agents the realism and displacement metrics score, WOSAC's objects: valid at the
        current step (the last history step), and in ``scored`` if given."""
        objs = self.log_valid[:, self.history_steps - 1]
        return objs if self.scored is None else objs & self.scored.to(objs.device)

    @property
    def num_rollouts(self) -> int:
        return int(self.sim.shape[0])

    @property
    def num_agents(self) -> int:
        return int(self.sim.shape[1])

    @property
    def num_steps(self) -> int:
        return int(self.sim.shape[2])

    def validate(self) -> None:
        """Raise ``RolloutError`` naming the first inconsistency (checked once per object: like the features
        memoised on it, a ``Rollouts`` is treated as immutable)."""
        if self in _VALIDATED:
            return
        self._check()
        _VALIDATED.add(self)

    def _check(self) -> None:
        r, a, t, f = self.sim.shape if self.sim.dim() == 4 else (None,) * 4
        if self.sim.dim() != 4 or f != 5:
            raise RolloutError(f"Rollouts {self.scene_id}: sim must be (R, A, T, 5), got {tuple(self.sim.shape)}.")
        checks = {"sim_valid": (self.sim_valid, (r, a, t)), "log": (self.log, (a, t, 5)),
                  "log_valid": (self.log_valid, (a, t)), "agent_type": (self.agent_type, (a,)),
                  "extent": (self.extent, (a, 2))}
        for name, (value, shape) in checks.items():
            if tuple(value.shape) != shape:
                raise RolloutError(f"Rollouts {self.scene_id}: {name} has shape {tuple(value.shape)}, "
                                   f"expected {shape}.")
        if len(self.agent_ids) != a:
            raise RolloutError(f"Rollouts {self.scene_id}: {len(self.agent_ids)} agent ids for {a} agents.")
        if len(set(map(str, self.agent_ids))) != a:
            raise RolloutError(f"Rollouts {self.scene_id}: agent ids are not unique.")
        if not 0 < self.history_steps < t:
            raise RolloutError(f"Rollouts {self.scene_id}: history_steps={self.history_steps} outside (0, {t}).")
        for name, value, valid in (("sim", self.sim, self.sim_valid), ("log", self.log, self.log_valid)):
            if not _finite_where_valid(value, valid):
                raise RolloutError(f"Rollouts {self.scene_id}: {name} holds NaN/inf at valid steps.")
        if not torch.isfinite(self.extent).all() or (self.extent <= 0).any():
            raise RolloutError(f"Rollouts {self.scene_id}: extent must be finite and > 0 m.")
        if not -1 <= self.ego_index < a:
            raise RolloutError(f"Rollouts {self.scene_id}: ego_index {self.ego_index} outside [-1, {a}).")
        if self.scored is not None and (tuple(self.scored.shape) != (a,) or self.scored.dtype != torch.bool):
            raise RolloutError(f"Rollouts {self.scene_id}: scored must be an (A,) = ({a},) bool mask, got "
                               f"{tuple(self.scored.shape)} {self.scored.dtype}.")
        # The history is the log, so agents in another order than agent_ids / the log show up here.
        h = self.history_steps - 1
        both = self.sim_valid[:, :, h] & self.log_valid[None, :, h]
        off = (self.sim[:, :, h, :2] - self.log[None, :, h, :2]).norm(dim=-1) > HISTORY_TOLERANCE
        if (both & off).any():
            bad = int((both & off).any(dim=0).nonzero()[0, 0])
            raise RolloutError(f"Rollouts {self.scene_id}: agent {self.agent_ids[bad]!r} is not at its logged "
                               f"position at the last history step {h}; sim and log agents must be in the "
                               "order of agent_ids.")
        given = [x is not None for x in (self.context, self.context_valid, self.context_extent)]
        if any(given) and not all(given):
            raise RolloutError(f"Rollouts {self.scene_id}: context, context_valid and context_extent go together.")
        if all(given):
            a2 = self.context.shape[0] if self.context.dim() == 3 else -1
            for name, value, shape in (("context", self.context, (a2, t, 5)),
                                       ("context_valid", self.context_valid, (a2, t)),
                                       ("context_extent", self.context_extent, (a2, 2))):
                if a2 < 0 or tuple(value.shape) != shape:
                    raise RolloutError(f"Rollouts {self.scene_id}: {name} has shape {tuple(value.shape)}, "
                                       f"expected {shape}.")
            if not _finite_where_valid(self.context, self.context_valid):
                raise RolloutError(f"Rollouts {self.scene_id}: context holds NaN/inf at valid steps.")


def cpu_numpy(x: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy view (or copy, when needed) of a tensor for the compiled loops, on the CPU."""
    return np.ascontiguousarray(x.detach().cpu().numpy())


def _finite_where_valid(values: torch.Tensor, valid: torch.Tensor) -> bool:
    """Whether ``values`` ``(..., 5)`` is finite wherever ``valid`` ``(...)`` is (one compiled pass, no masks)."""
    return all_finite_where_valid(cpu_numpy(values.float()).reshape(-1, 5), cpu_numpy(valid).reshape(-1))


@dataclass(frozen=True)
class EpisodeMetric:
    name: str
    units: str
    doc: str
    fn: Callable[[Rollouts], dict[str, float]]
    family: str
    min_rollouts: int = 1  # rollouts per scene the metric needs (a histogram of rollouts needs two)


EPISODE_METRICS: dict[str, EpisodeMetric] = {}


def register_episode_metric(name: str, units: str, doc: str, family: str, min_rollouts: int = 1):
    """Decorator registering ``fn(rollouts) -> {name: value, ...}`` (one metric may report several values,
    e.g. per-feature likelihoods); ``min_rollouts``: how many rollouts per scene it needs (checked up front by
    ``check_metrics``). Duplicate names are refused."""

    def wrap(fn):
        if name in EPISODE_METRICS:
            raise TrafficGymError(f"Episode metric {name!r} is already registered.")
        EPISODE_METRICS[name] = EpisodeMetric(name, units, doc, fn, family, min_rollouts)
        return fn

    return wrap


def _load_families() -> None:
    import importlib

    for module in ("envs.metrics.realism", "envs.metrics.blm", "envs.metrics.planning"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def episode_metric_names(family: str | None = None) -> list[str]:
    _load_families()
    return sorted(n for n, m in EPISODE_METRICS.items() if family is None or m.family == family)


def check_metrics(names, num_rollouts: int) -> list[str]:
    """The metric names to compute (default: all registered), checked before anything is rolled out: an unknown
    name raises ``UnknownNameError``, too few rollouts for a metric a ``RolloutError`` naming it and the fix."""
    names = _known(names)
    short = [n for n in names if num_rollouts < EPISODE_METRICS[n].min_rollouts]
    if short:
        need = max(EPISODE_METRICS[n].min_rollouts for n in short)
        raise RolloutError(f"{num_rollouts} rollout(s) per scene are too few for the metric(s) {short}, which need "
                           f"at least {need}. Sample more rollouts (e.g. --rollouts 32, the WOSAC protocol) or choose "
                           "other metrics (--metric min_ade --metric blm_safety ...).")
    return names


def compute_episode_metrics(rollouts: Rollouts, names=None) -> dict[str, float]:
    """Every requested metric (default: all registered) of one scene's rollouts, flattened into one dict."""
    names = _known(names)
    rollouts.validate()
    out: dict[str, float] = {}
    for name in names:
        out.update(EPISODE_METRICS[name].fn(rollouts))
    return out


def _known(names) -> list[str]:
    """``names`` as a list (default: every registered metric); ``UnknownNameError`` for the first unknown one."""
    _load_families()
    names = list(EPISODE_METRICS) if names is None else list(names)
    for name in names:
        if name not in EPISODE_METRICS:
            raise UnknownNameError("episode metric", name, EPISODE_METRICS)
    return names


def rollouts_from_log(scene, num_rollouts: int, history_steps: int = 11, map_index=None,
                      sim: np.ndarray | torch.Tensor | None = None,
                      sim_valid: np.ndarray | torch.Tensor | None = None) -> Rollouts:
    """``Rollouts`` of a ``Scene``: the evaluated agents are those valid at the last history step (WOSAC), the
    others become log-replayed context. ``sim`` ``(R, A_eval, T, 5)`` / ``sim_valid`` default to R copies of the
    log (the "perfect" rollouts, handy as an upper bound and for tests)."""
    h = history_steps
    live = np.flatnonzero(scene.valid[:, h - 1])
    others = np.setdiff1d(np.arange(scene.num_agents), live)
    log = torch.as_tensor(scene.trajectory[live], dtype=torch.float32)
    log_valid = torch.as_tensor(scene.valid[live])
    if sim is None:
        sim = log[None].repeat(num_rollouts, 1, 1, 1)
        sim_valid = log_valid[None].repeat(num_rollouts, 1, 1)
    ego = int(np.searchsorted(live, scene.ego_index)) if scene.ego_index in live else -1
    ctx = len(others) > 0
    return Rollouts(scene_id=scene.scene_id, agent_ids=scene.agent_ids[live],
                    agent_type=torch.as_tensor(scene.agent_type[live]).long(),
                    extent=torch.as_tensor(scene.extent[live], dtype=torch.float32),
                    sim=torch.as_tensor(sim, dtype=torch.float32), sim_valid=torch.as_tensor(sim_valid),
                    log=log, log_valid=log_valid, history_steps=h, dt=float(scene.dt), map_index=map_index,
                    ego_index=ego,
                    context=torch.as_tensor(scene.trajectory[others], dtype=torch.float32) if ctx else None,
                    context_valid=torch.as_tensor(scene.valid[others]) if ctx else None,
                    context_extent=torch.as_tensor(scene.extent[others], dtype=torch.float32) if ctx else None,
                    traffic_lights=TrafficLights.from_scene(scene))
