"""The engine shared by the single env, the native vector env and the PettingZoo view: B episode slots in one
batched ``SimState``, with action checking, traffic, metrics, rewards and termination. Numpy at its edges.

What the caller controls and gets back is the engine's ``Task`` (``envs/tasks.py``): ``"ego"`` (one controlled
agent per slot: the ego) or ``"sim_agents"`` (every agent valid at the start step is controlled, the WOSAC
setting).
"""

from __future__ import annotations

import numpy as np
import torch

from envs import sim
from envs.config import EnvConfig
from envs.dynamics import from_normalized, make_dynamics
from envs.errors import InvalidActionError, NoEgoError, ResetNeededError
from envs.metrics import compute_step_metrics, compute_step_metrics_and_pairs
from envs.policy import check_policy_action
from envs.rewards import compute_reward
from envs.tasks import TASKS, Task, make_task
from envs.traffic import assign, driven_by_names, resolve_traffic
from envs.types import Action, SimState

MODES = tuple(TASKS)
INFO_METRICS = ("collision", "offroad", "road_edge_distance", "progress", "log_divergence", "speed",
                "acceleration", "jerk", "infeasible")


class TrafficEngine:
    """B episode slots over one dataset split. ``reset_slots`` starts episodes, ``step`` advances all slots.

    task: ``"ego"``, ``"sim_agents"`` or a ``Task`` object (``envs/tasks.py``)."""

    def __init__(self, cfg: EnvConfig, num_slots: int, task: str | Task, single: bool = False):
        from envs.data import open_dataset

        if isinstance(task, str) and task not in MODES:
            raise ValueError(f"task must be one of {MODES} (or a Task), got {task!r}.")
        self.task = make_task(task)
        self.cfg, self.num_slots, self.single = cfg, num_slots, single
        self.dataset = open_dataset(cfg.dataset, cfg.split, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir,
                                    case_length=cfg.case_length)
        ids = list(cfg.scenes) if cfg.scenes is not None else self.dataset.scene_ids
        indices = [self.dataset.index_of(i) for i in ids]
        self.scene_indices = self.task.select_scenes(indices, [self.dataset.entry(i).ego_index for i in indices],
                                                     cfg)
        if not self.scene_indices:
            raise ValueError(f"No scenes selected from {cfg.dataset}/{cfg.split}.")
        entries = [self.dataset.entry(i) for i in self.scene_indices]
        largest = max(e.num_agents for e in entries)
        if cfg.max_agents is not None and cfg.max_agents < largest:
            raise ValueError(f"max_agents={cfg.max_agents} but the selected scenes hold up to {largest} agents; "
                             f"raise max_agents or select smaller scenes.")
        self.num_agents = cfg.max_agents or largest
        self.num_steps = max(e.num_steps for e in entries)
        self._map_ids = sorted({e.map_id for e in entries})
        self.maps = self._stack_maps()
        self.dynamics = make_dynamics(cfg.dynamics)
        self.traffic = resolve_traffic(cfg.traffic)
        self._assignment: torch.Tensor | None = None
        low, high = self.dynamics.bounds()
        self.physical_low, self.physical_high = low.numpy(), high.numpy()
        if cfg.action_scale == "normalized":
            self.action_low, self.action_high = -np.ones_like(self.physical_low), np.ones_like(self.physical_high)
        else:
            self.action_low, self.action_high = self.physical_low, self.physical_high
        self.state: SimState | None = None
        self.done = np.ones(num_slots, bool)
        self.slot_scene = np.full(num_slots, -1, np.int64)
        self._prev_progress: torch.Tensor | None = None
        self._episode: dict[str, np.ndarray] | None = None  # per-slot running episode statistics

    def _stack_maps(self):
        return sim.stack_maps([self.dataset.map(m) for m in self._map_ids], self.cfg.device,
                              indices=[self.dataset.map_index(m) for m in self._map_ids])

    # Pickling (and copy.deepcopy) leaves out the dataset and the stacked maps (hundreds of MB for the towns,
    # rasters included) and re-opens them from the on-disk scene cache, as a subprocess worker would: what travels
    # is the config, the running episodes, the traffic policies and the RNG-driven bookkeeping (a few MB at most).
    def __getstate__(self):
        from dataclasses import replace

        state = {k: v for k, v in self.__dict__.items() if k not in ("dataset", "maps")}
        if self.state is not None:
            state["state"] = replace(self.state, maps=None)
        return state

    def __setstate__(self, state):
        from dataclasses import replace

        from envs.data import open_dataset

        self.__dict__.update(state)
        cfg = self.cfg
        self.dataset = open_dataset(cfg.dataset, cfg.split, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir,
                                    case_length=cfg.case_length)
        self.maps = self._stack_maps()
        if self.state is not None:
            self.state = replace(self.state, maps=self.maps)

    @property
    def mode(self) -> str:
        """The task's name: ``"ego"`` or ``"sim_agents"``."""
        return self.task.name

    @property
    def assignment(self) -> torch.Tensor | None:
        """``(B, A)`` long: the index of the traffic rule (``self.traffic``) driving each agent, -1 for log replay,
        the caller's agents and padding (None before the first reset)."""
        return self._assignment

    def driven_by(self, slot: int) -> np.ndarray:
        """``(A,)`` names of what drives each agent slot of ``slot``'s scene: ``"env"`` (the caller), a policy
        name, ``"log"``, or ``""`` for padding."""
        if self.state is None:
            raise ResetNeededError("Call reset() before asking who drives the agents.")
        st = self.state
        return driven_by_names(self._assignment[slot].cpu().numpy(), st.controlled[slot].cpu().numpy(),
                               st.agent_mask[slot].cpu().numpy(), self.traffic)

    # ---- spaces ------------------------------------------------------------------------------------------
    def observation_space(self):
        return self.task.observation_space(self.cfg, self.maps.chunks.shape[2], self.num_agents)

    def action_space(self):
        return self.task.action_space(self.action_low, self.action_high, self.num_agents)

    # ---- episodes ----------------------------------------------------------------------------------------
    @torch.inference_mode()  # the env's state never feeds autograd; this cuts torch's per-op overhead by ~30 %
    def reset_slots(self, slots: np.ndarray, scene_positions: np.ndarray, seed: int | None = None) -> None:
        """Start fresh episodes in ``slots`` on the scenes at ``scene_positions`` (indices into the selection);
        ``seed`` seeds the traffic policies."""
        scenes = [self.dataset[self.scene_indices[int(p)]] for p in scene_positions]
        controlled = self.task.controlled(scenes, self.cfg)
        try:
            fresh = sim.reset(scenes, self.cfg.start_step, controlled, self.cfg.device, self.num_agents,
                              self.num_steps, maps=self.maps)
        except NoEgoError:
            if self.task.needs_ego:
                raise
            fresh = None
        if fresh is None:  # a task without an ego: pick any live agent as the nominal one
            fixed = [_with_nominal_ego(s, self.cfg.start_step) for s in scenes]
            fresh = sim.reset(fixed, self.cfg.start_step, controlled, self.cfg.device, self.num_agents,
                              self.num_steps, maps=self.maps)
        if self.state is None or len(slots) == self.num_slots and np.array_equal(slots, np.arange(self.num_slots)):
            self.state = fresh
        else:
            self.state = _write_slots(self.state, fresh, torch.as_tensor(slots, device=fresh.device))
        progress = compute_step_metrics(self.state, ["progress"])["progress"]
        if self._prev_progress is None or self._prev_progress.shape != progress.shape:
            self._prev_progress = progress
        else:
            idx = torch.as_tensor(slots, device=progress.device)
            self._prev_progress[idx] = progress[idx]
        slots_t = torch.as_tensor(slots, device=self.state.device)
        fresh_assignment = assign(self.state, self.traffic)
        if self._assignment is None or self._assignment.shape != fresh_assignment.shape:
            self._assignment = fresh_assignment
        else:
            self._assignment[slots_t] = fresh_assignment[slots_t]
        for k, rule in enumerate(self.traffic):
            if rule.policy is not None and hasattr(rule.policy, "reset"):
                rule.policy.reset(self.state, self._assignment == k, seed=None if seed is None else seed + k,
                                  slots=None if len(slots) == self.num_slots else slots_t)
        self.done[slots] = False
        self.slot_scene[slots] = scene_positions
        self._start_episodes(slots, progress)

    def _start_episodes(self, slots: np.ndarray, progress: torch.Tensor) -> None:
        """Zero the running episode statistics of ``slots`` (what ``episode_stats`` reports at the end)."""
        shape = tuple(progress.shape)
        if self._episode is None or self._episode["collision"].shape != shape:
            self._episode = {"return": np.zeros(self.num_slots), "length": np.zeros(self.num_slots, np.int64),
                             "collision": np.zeros(shape, bool), "offroad": np.zeros(shape, bool),
                             "start_progress": np.zeros(shape)}
        ep = self._episode
        ep["return"][slots], ep["length"][slots] = 0.0, 0
        ep["collision"][slots], ep["offroad"][slots] = False, False
        ep["start_progress"][slots] = progress.cpu().numpy()[slots]

    # ---- observations ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def observe(self) -> dict[str, np.ndarray] | np.ndarray:
        """Observations of every slot, numpy, leading axis B (a dict of arrays, or one ``(B, F)`` array with
        ``ObsConfig(flat=True)``)."""
        out = self.task.observe(self.state, self.cfg)
        if isinstance(out, torch.Tensor):
            return out.detach().cpu().numpy().astype(np.float32, copy=False)
        return {k: v.detach().cpu().numpy().astype(np.float32, copy=False) for k, v in out.items()}

    def dict_observation_space(self):
        """The ``Dict`` space of one slot's observation before ``ObsConfig(flat=True)`` flattens it (for
        ``gymnasium.spaces.unflatten``); the observation space itself when it is not flat."""
        from envs.observation import observation_space

        if not self.cfg.obs.flat:
            return self.observation_space()
        return observation_space(self.cfg.obs, self.maps.chunks.shape[2])

    # ---- stepping ----------------------------------------------------------------------------------------
    def check_action(self, action, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validate a batch of actions against the action space; returns (actions, infeasible flags)."""
        expected = (self.num_slots, *self.task.action_shape(self.num_agents, self.dynamics.action_dim))
        try:
            arr = np.asarray(action)
        except Exception as e:  # ragged lists and the like
            raise InvalidActionError(f"Action {action!r} is not array-like: {e}.") from e
        if arr.shape != expected:
            got, want = (arr.shape[1:], expected[1:]) if self.single else (arr.shape, expected)
            raise InvalidActionError(f"Action has shape {got}, expected {want} ({self.dynamics.name} dynamics: "
                                     f"{', '.join(self.dynamics.action_names)}"
                                     f"{self.task.describe_action()}).")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise InvalidActionError(f"Action dtype {arr.dtype} is not numeric; pass a float array.")
        arr = arr.astype(np.float32)
        rows = self._checked_rows(active)
        bad = ~np.isfinite(arr).all(-1)  # every row, also those ignored below: NaN and inf always raise
        if bad.any():
            at = np.argwhere(bad)[:4, 1 if self.single else 0:]  # (env,) agent slot of the first few
            at = at[:, 0] if at.shape[1] == 1 else at
            raise InvalidActionError(f"Action holds NaN or inf: {arr[bad][:4]}"
                                     f"{f' at index {at.tolist()}' if at.size else ''}. Every row must be finite, "
                                     f"also rows the env ignores (agents it does not control, padding): pass 0.")
        out_of_bounds = ((arr < self.action_low) | (arr > self.action_high)).any(-1) & rows
        if out_of_bounds.any():
            if self.cfg.action_bounds == "raise":
                bad = arr[out_of_bounds][0]
                raise InvalidActionError(
                    f"Action {bad.tolist()} is outside the bounds low={self.action_low.tolist()}, "
                    f"high={self.action_high.tolist()} ({', '.join(self.dynamics.action_names)}). Clip it, or create "
                    f"the env with action_bounds='clip' to clip and flag it as infeasible.")
            arr = np.clip(arr, self.action_low, self.action_high)
        if self.cfg.action_scale == "normalized":  # [-1, 0, 1] -> [low, 0, high], piecewise linear
            arr = from_normalized(arr, self.physical_low, self.physical_high)
        return arr, out_of_bounds

    def _checked_rows(self, active: np.ndarray) -> np.ndarray:
        return self.task.checked_rows(self.state, active)

    @torch.inference_mode()
    def step(self, action, active: np.ndarray | None = None):
        """Advance every active slot one step. Returns (reward (B,), terminated (B,), truncated (B,), infos)."""
        if self.state is None:
            raise ResetNeededError("Call reset() before step().")
        active = ~self.done if active is None else active
        arr, infeasible = self.check_action(action, active)
        st = self.state
        dev = st.device
        data = self.task.scatter(torch.as_tensor(arr), st,
                                 torch.zeros(self.num_slots, self.num_agents, self.dynamics.action_dim, device=dev))
        active_t = torch.as_tensor(active, device=dev)
        own = Action(data, st.controlled & active_t[:, None])
        more = []
        for k, rule in enumerate(self.traffic):
            if rule.policy is None:
                continue  # an explicit "log" rule
            mask = (self._assignment == k) & active_t[:, None]
            act = check_policy_action(rule.policy, st, mask, rule.policy.act(st, mask))
            more.append((act, rule.policy.dynamics))
        frozen_t = st.t.clone()
        new = sim.step(st, own, self.dynamics, more)
        # Inactive slots (finished, awaiting reset) must not advance.
        new = _hold(new, frozen_t, active_t)
        self.state = new
        infeasible_t = self.task.scatter(torch.as_tensor(infeasible), st,
                                         torch.zeros(self.num_slots, self.num_agents, dtype=torch.bool, device=dev))
        metrics, pairs = compute_step_metrics_and_pairs(new, extra={"infeasible": infeasible_t})
        delta = metrics["progress"] - self._prev_progress
        self._prev_progress = metrics["progress"]
        per_agent = compute_reward(self.cfg.reward, metrics, delta)  # (B, A)
        return self._outcome(new, metrics, pairs, per_agent, active)

    def _outcome(self, st: SimState, metrics, pairs, per_agent, active):
        truncated = (st.t >= st.end).cpu().numpy()
        reward = self.task.reward(per_agent, st).cpu().numpy()
        terminated = self.task.terminated(metrics, st, self.cfg).cpu().numpy()
        terminated &= active
        truncated &= active & ~terminated
        self.done |= terminated | truncated
        host = {k: metrics[k].cpu().numpy() for k in INFO_METRICS}
        infos = self._infos(st, host, pairs.cpu().numpy(), per_agent)
        ended = self._record_episodes(st, host, reward, active, terminated | truncated)
        for b, stats in ended.items():
            infos[b]["episode_stats"] = stats
        return reward.astype(np.float64), terminated, truncated, infos

    def _record_episodes(self, st: SimState, host: dict, reward, active, ended) -> dict[int, dict]:
        """Accumulate the step (``host``: the info metrics, numpy) into the running episode statistics;
        ``{slot: episode_stats}`` of the slots whose episode ended this step (see ``Task.episode_stats``)."""
        ep = self._episode
        act = np.asarray(active, bool)
        ep["return"][act] += reward[act]
        ep["length"][act] += 1
        ep["collision"][act] |= host["collision"][act]
        ep["offroad"][act] |= host["offroad"][act]
        out = {}
        if ended.any():
            progress = host["progress"]
            controlled = (st.controlled & st.agent_mask).cpu().numpy()
            ego = st.ego.cpu().numpy()
            for b in np.flatnonzero(ended):
                out[int(b)] = {"return": float(ep["return"][b]), "length": int(ep["length"][b]),
                               **self.task.episode_stats(ep["collision"][b], ep["offroad"][b],
                                                         progress[b] - ep["start_progress"][b], controlled[b],
                                                         int(ego[b]))}
        return out

    def _infos(self, st: SimState, host: dict, pairs: np.ndarray, per_agent) -> list[dict]:
        ids = st.scene_ids
        t = st.t.cpu().numpy()
        controlled = st.controlled.cpu().numpy()
        agent_mask = st.agent_mask.cpu().numpy()
        assignment = self._assignment.cpu().numpy()
        infos = []
        for b in range(self.num_slots):
            info = {"scene_id": ids[b], "t": int(t[b]),
                    "driven_by": driven_by_names(assignment[b], controlled[b], agent_mask[b], self.traffic)}
            info.update(self.task.info(b, st, host, pairs, per_agent))
            infos.append(info)
        return infos


def _write_slots(state: SimState, fresh: SimState, slots: torch.Tensor) -> SimState:
    """Copy the per-scene rows of ``fresh`` (len(slots) scenes) into ``state`` at ``slots``.

    Shapes match (fixed agent and step padding) except the route length, which grows to the longer of the two.
    """
    from dataclasses import fields, replace

    updates = {}
    p_old, p_new = state.route_xy.shape[2], fresh.route_xy.shape[2]
    if p_new > p_old:
        updates["route_xy"] = _pad_routes(state.route_xy, p_new)
    elif p_new < p_old:
        fresh = replace(fresh, route_xy=_pad_routes(fresh.route_xy, p_old))
    state = replace(state, **updates)
    for f in fields(SimState):
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            value[slots] = getattr(fresh, f.name)
    ids = list(state.scene_ids)
    for k, s in enumerate(slots.tolist()):
        ids[s] = fresh.scene_ids[k]
    return replace(state, scene_ids=tuple(ids))


def _pad_routes(route_xy: torch.Tensor, points: int) -> torch.Tensor:
    """Pad ``(B, A, P, 2)`` routes to ``points`` by repeating each route's last point."""
    extra = route_xy[:, :, -1:].expand(-1, -1, points - route_xy.shape[2], -1)
    return torch.cat([route_xy, extra], dim=2)


def _hold(state: SimState, old_t: torch.Tensor, active: torch.Tensor) -> SimState:
    """Undo the time advance of inactive slots (their buffer row at the new t is rewritten on their reset)."""
    from dataclasses import replace

    return replace(state, t=torch.where(active, state.t, old_t))


def _with_nominal_ego(scene, start_step: int):
    from dataclasses import replace

    live = np.flatnonzero(scene.valid[:, start_step])
    if live.size == 0:
        from envs.errors import EmptySceneError

        raise EmptySceneError(f"Scene {scene.scene_id} has no agent valid at step {start_step}.")
    return replace(scene, ego_index=int(live[0]))
