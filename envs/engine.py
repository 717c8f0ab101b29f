"""The engine shared by the single env, the native vector env and the PettingZoo view: B episode slots in one
batched ``SimState``, with action checking, traffic, metrics, rewards and termination. Numpy at its edges.

Two modes: ``"ego"`` (one controlled agent per slot: the ego) and ``"sim_agents"`` (every agent valid at the
start step is controlled, the WOSAC setting).
"""

from __future__ import annotations

import numpy as np
import torch

from envs import sim
from envs.config import EnvConfig
from envs.dynamics import make_dynamics
from envs.errors import InvalidActionError, NoEgoError, ResetNeededError
from envs.metrics import compute_step_metrics
from envs.observation import observation_space, observe
from envs.policy import check_policy_action
from envs.rewards import compute_reward
from envs.traffic import assign, driven_by_names, resolve_traffic
from envs.types import Action, SimState

MODES = ("ego", "sim_agents")
INFO_METRICS = ("collision", "offroad", "road_edge_distance", "progress", "log_divergence", "speed",
                "acceleration", "jerk", "infeasible")


class TrafficEngine:
    """B episode slots over one dataset split. ``reset_slots`` starts episodes, ``step`` advances all slots."""

    def __init__(self, cfg: EnvConfig, num_slots: int, mode: str, single: bool = False):
        from envs.data import open_dataset

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.cfg, self.mode, self.num_slots, self.single = cfg, mode, num_slots, single
        self.dataset = open_dataset(cfg.dataset, cfg.split, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir,
                                    case_length=cfg.case_length)
        ids = list(cfg.scenes) if cfg.scenes is not None else self.dataset.scene_ids
        self.scene_indices = [self.dataset.index_of(i) for i in ids]
        if mode == "ego" and cfg.scenes is None:  # scenes without an ego cannot host the ego env
            self.scene_indices = [i for i in self.scene_indices if self.dataset._entries[i]["ego_index"] >= 0]
            if not self.scene_indices:
                raise NoEgoError(f"No scene of {cfg.dataset}/{cfg.split} has an ego candidate (a vehicle observed "
                                 f"throughout); use trafficgym/SimAgents-v0, which needs none.")
        if not self.scene_indices:
            raise ValueError(f"No scenes selected from {cfg.dataset}/{cfg.split}.")
        entries = [self.dataset._entries[i] for i in self.scene_indices]
        largest = max(e["num_agents"] for e in entries)
        if cfg.max_agents is not None and cfg.max_agents < largest:
            raise ValueError(f"max_agents={cfg.max_agents} but the selected scenes hold up to {largest} agents; "
                             f"raise max_agents or select smaller scenes.")
        self.num_agents = cfg.max_agents or largest
        self.num_steps = max(e["num_steps"] for e in entries)
        map_ids = sorted({e["map_id"] for e in entries})
        self.maps = sim.stack_maps([self.dataset.map(m) for m in map_ids], cfg.device,
                                   indices=[self.dataset.map_index(m) for m in map_ids])
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

    # ---- spaces ------------------------------------------------------------------------------------------
    def observation_space(self):
        chunk_points = self.maps.chunks.shape[2]
        if self.mode == "ego":
            return observation_space(self.cfg.obs, chunk_points)
        space = observation_space(self.cfg.obs, chunk_points, prefix=(self.num_agents,))
        from gymnasium import spaces

        space.spaces["controlled"] = spaces.Box(0.0, 1.0, shape=(self.num_agents,), dtype=np.float32)
        return space

    def action_space(self):
        from gymnasium import spaces

        if self.mode == "ego":
            return spaces.Box(self.action_low, self.action_high, dtype=np.float32)
        shape = (self.num_agents, self.dynamics.action_dim)
        return spaces.Box(np.broadcast_to(self.action_low, shape).copy(),
                          np.broadcast_to(self.action_high, shape).copy(), dtype=np.float32)

    # ---- episodes ----------------------------------------------------------------------------------------
    @torch.inference_mode()  # the env's state never feeds autograd; this cuts torch's per-op overhead by ~30 %
    def reset_slots(self, slots: np.ndarray, scene_positions: np.ndarray, seed: int | None = None) -> None:
        """Start fresh episodes in ``slots`` on the scenes at ``scene_positions`` (indices into the selection);
        ``seed`` seeds the traffic policies."""
        scenes = [self.dataset[self.scene_indices[int(p)]] for p in scene_positions]
        controlled = "ego" if self.mode == "ego" else [self._controlled_mask(s) for s in scenes]
        try:
            fresh = sim.reset(scenes, self.cfg.start_step, controlled, self.cfg.device, self.num_agents,
                              self.num_steps, maps=self.maps)
        except NoEgoError:
            if self.mode == "ego":
                raise
            fresh = None
        if fresh is None:  # sim-agents mode does not need an ego: pick any live agent as the nominal one
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

    def _controlled_mask(self, scene) -> np.ndarray:
        """Who the sim-agents env controls in ``scene`` (before the valid-at-start filter in ``sim.reset``)."""
        from envs.types import AgentType

        wanted = self.cfg.controlled
        if wanted == "all":
            return np.ones(scene.num_agents, bool)
        if wanted == "vehicles":
            return scene.agent_type == AgentType.VEHICLE
        return np.isin(scene.agent_ids, np.asarray(wanted, dtype=str))

    # ---- observations ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def observe(self) -> dict[str, np.ndarray]:
        """Observations of every slot, numpy, leading axis B."""
        st = self.state
        if self.mode == "ego":
            obs = observe(st, st.ego[:, None], self.cfg.obs)
            out = {k: v[:, 0] for k, v in obs.items()}
        else:
            observers = torch.arange(self.num_agents, device=st.device).expand(self.num_slots, -1)
            out = observe(st, observers, self.cfg.obs)
            live = (st.controlled & st.current_valid)[..., None]
            out = {k: v * live.reshape(*live.shape[:2], *([1] * (v.dim() - 2))) for k, v in out.items()}
            out["controlled"] = st.controlled.float()
        return {k: v.detach().cpu().numpy().astype(np.float32, copy=False) for k, v in out.items()}

    # ---- stepping ----------------------------------------------------------------------------------------
    def check_action(self, action, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validate a batch of actions against the action space; returns (actions, infeasible flags)."""
        expected = (self.num_slots, self.dynamics.action_dim) if self.mode == "ego" else \
            (self.num_slots, self.num_agents, self.dynamics.action_dim)
        try:
            arr = np.asarray(action)
        except Exception as e:  # ragged lists and the like
            raise InvalidActionError(f"Action {action!r} is not array-like: {e}.") from e
        if arr.shape != expected:
            got, want = (arr.shape[1:], expected[1:]) if self.single else (arr.shape, expected)
            raise InvalidActionError(f"Action has shape {got}, expected {want} ({self.dynamics.name} dynamics: "
                                     f"{', '.join(self.dynamics.action_names)}"
                                     f"{' per agent slot' if self.mode == 'sim_agents' else ''}).")
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
            arr = np.where(arr >= 0, arr * self.physical_high, -arr * self.physical_low).astype(np.float32)
        return arr, out_of_bounds

    def _checked_rows(self, active: np.ndarray) -> np.ndarray:
        if self.mode == "ego":
            return active.copy()
        ctrl = (self.state.controlled & self.state.current_valid).cpu().numpy()
        return ctrl & active[:, None]

    @torch.inference_mode()
    def step(self, action, active: np.ndarray | None = None):
        """Advance every active slot one step. Returns (reward (B,), terminated (B,), truncated (B,), infos)."""
        if self.state is None:
            raise ResetNeededError("Call reset() before step().")
        active = ~self.done if active is None else active
        arr, infeasible = self.check_action(action, active)
        st = self.state
        dev = st.device
        data = torch.zeros(self.num_slots, self.num_agents, self.dynamics.action_dim, device=dev)
        if self.mode == "ego":
            data[torch.arange(self.num_slots, device=dev), st.ego] = torch.as_tensor(arr, device=dev)
        else:
            data[:] = torch.as_tensor(arr, device=dev)
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
        infeasible_t = torch.zeros(self.num_slots, self.num_agents, dtype=torch.bool, device=dev)
        if self.mode == "ego":
            infeasible_t[torch.arange(self.num_slots, device=dev), st.ego] = torch.as_tensor(infeasible, device=dev)
        else:
            infeasible_t[:] = torch.as_tensor(infeasible, device=dev)
        metrics = compute_step_metrics(new, extra={"infeasible": infeasible_t})
        delta = metrics["progress"] - self._prev_progress
        self._prev_progress = metrics["progress"]
        per_agent = compute_reward(self.cfg.reward, metrics, delta)  # (B, A)
        return self._outcome(new, metrics, per_agent, active)

    def _outcome(self, st: SimState, metrics, per_agent, active):
        b = torch.arange(self.num_slots, device=st.device)
        truncated = (st.t >= st.end).cpu().numpy()
        if self.mode == "ego":
            ego = st.ego
            reward = per_agent[b, ego].cpu().numpy()
            term = torch.zeros(self.num_slots, dtype=torch.bool, device=st.device)
            if self.cfg.terminate_on_collision:
                term |= metrics["collision"][b, ego]
            if self.cfg.terminate_on_offroad:
                term |= metrics["offroad"][b, ego]
            terminated = term.cpu().numpy()
        else:
            ctrl = st.controlled.float()
            reward = ((per_agent * ctrl).sum(-1) / ctrl.sum(-1).clamp(min=1)).cpu().numpy()
            terminated = np.zeros(self.num_slots, bool)
        terminated &= active
        truncated &= active & ~terminated
        self.done |= terminated | truncated
        infos = self._infos(st, metrics, per_agent)
        return reward.astype(np.float64), terminated, truncated, infos

    def _infos(self, st: SimState, metrics, per_agent) -> list[dict]:
        pairs = metrics["_collision_pairs"].cpu().numpy()
        ids = st.scene_ids
        host = {k: metrics[k].cpu().numpy() for k in INFO_METRICS}
        t = st.t.cpu().numpy()
        controlled = st.controlled.cpu().numpy()
        agent_mask = st.agent_mask.cpu().numpy()
        assignment = self._assignment.cpu().numpy()
        infos = []
        for b in range(self.num_slots):
            info = {"scene_id": ids[b], "t": int(t[b]),
                    "driven_by": driven_by_names(assignment[b], controlled[b], agent_mask[b], self.traffic)}
            if self.mode == "ego":
                e = int(st.ego[b])
                info["metrics"] = {k: float(v[b, e]) for k, v in host.items()}
                mine = pairs[(pairs[:, 0] == b) & ((pairs[:, 1] == e) | (pairs[:, 2] == e))]
                info["collided_with"] = sorted({int(j if i == e else i) for _, i, j in mine})
            else:
                info["metrics"] = {k: v[b].copy() for k, v in host.items()}
                info["agent_rewards"] = per_agent[b].cpu().numpy()
                info["collision_pairs"] = pairs[pairs[:, 0] == b][:, 1:].copy()
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
