"""What the caller of an env controls, and what it gets back: one task object per setting, on one shared engine
(``envs.engine.TrafficEngine``), as Waymax separates its planning-agent environment from the base simulator.

``EgoTask`` (``trafficgym/Ego-v0``): one controlled agent per slot, the scene's ego; observations, action,
reward and termination are the ego's. ``SimAgentsTask`` (``trafficgym/SimAgents-v0``, the WOSAC setting): every
agent valid at the start step that the config selects is controlled; observations and actions are per agent
slot, the reward is the mean over the controlled agents, nothing terminates early.

A task decides: which scenes can host it, whom ``sim.reset`` marks as controlled, the observation and action
spaces, where the caller's action rows go in the batched ``(B, A, D)`` action, the reward and termination
reductions of the per-agent values, and the per-slot ``info`` dict. Everything else (dynamics, traffic, metrics,
per-agent rewards) is the engine's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from envs.config import EnvConfig
from envs.errors import InvalidOptionError, NoEgoError, UnknownNameError
from envs.observation import flat_space, flatten, observation_space, observe
from envs.types import AgentType, SimState


class Task(ABC):
    """One env setting on the shared engine (see the module docstring). Stateless: one instance per engine."""

    name: str
    needs_ego: bool  # a scene without an ego candidate cannot host the task

    # ---- episodes --------------------------------------------------------------------------------------------
    def select_scenes(self, indices: list[int], ego_index: list[int], cfg: EnvConfig) -> list[int]:
        """The scenes (dataset indices) that can host the task; ``ego_index[k]`` is scene k's ego (-1: none)."""
        return indices

    @abstractmethod
    def controlled(self, scenes: list, cfg: EnvConfig):
        """The ``controlled`` argument of ``sim.reset`` for these scenes."""

    # ---- spaces ----------------------------------------------------------------------------------------------
    @abstractmethod
    def observation_space(self, cfg: EnvConfig, chunk_points: int, num_agents: int):
        """The gymnasium observation space of one slot."""

    @abstractmethod
    def action_shape(self, num_agents: int, action_dim: int) -> tuple[int, ...]:
        """The shape of one slot's action."""

    def action_space(self, low: np.ndarray, high: np.ndarray, num_agents: int):
        from gymnasium import spaces

        shape = self.action_shape(num_agents, len(low))
        return spaces.Box(np.broadcast_to(low, shape).copy(), np.broadcast_to(high, shape).copy(), dtype=np.float32)

    def describe_action(self) -> str:
        """How the action's rows are laid out, for error messages (e.g. ``" per agent slot"``)."""
        return ""

    # ---- stepping --------------------------------------------------------------------------------------------
    @abstractmethod
    def checked_rows(self, state: SimState, active: np.ndarray) -> np.ndarray:
        """Bool mask over the action's rows (leading ``(B,)`` or ``(B, A)``) that drive an agent."""

    @abstractmethod
    def scatter(self, rows: torch.Tensor, state: SimState, out: torch.Tensor) -> torch.Tensor:
        """``rows`` (the caller's per-slot values, shape ``(B, *action_shape)`` or ``(B, *action_shape[:-1])``)
        written into ``out`` ``(B, A, ...)`` at the agents they drive; returns ``out``."""

    @abstractmethod
    def observe(self, state: SimState, cfg: EnvConfig) -> dict[str, torch.Tensor]:
        """Observations of every slot, leading axis B."""

    @abstractmethod
    def reward(self, per_agent: torch.Tensor, state: SimState) -> torch.Tensor:
        """``(B,)`` reward from the ``(B, A)`` per-agent rewards."""

    @abstractmethod
    def terminated(self, metrics: dict, state: SimState, cfg: EnvConfig) -> torch.Tensor:
        """``(B,)`` bool: the episode ends before its last step."""

    @abstractmethod
    def episode_stats(self, collided: np.ndarray, offroad: np.ndarray, progress: np.ndarray, controlled: np.ndarray,
                      ego: int) -> dict:
        """The task's part of ``info["episode_stats"]`` at an episode's last step, from one slot's ``(A,)`` per-agent
        values over the episode: ``collided`` / ``offroad`` (ever), ``progress`` (m along the logged route since
        the start), ``controlled`` (the caller's agents); ``ego`` is the scene's ego index. Keys ``collision``,
        ``offroad`` (0/1 for the ego; the fraction of controlled agents for the sim-agents env) and ``progress``
        (m; the mean over controlled agents)."""

    @abstractmethod
    def info(self, b: int, state: SimState, host: dict, pairs: np.ndarray, per_agent: torch.Tensor) -> dict:
        """The task's part of slot ``b``'s info: ``metrics`` and what the caller's agents collided with. ``host``:
        the info metrics as ``(B, A)`` numpy arrays; ``pairs``: ``(K, 3)`` colliding ``(b, i, j)``."""


class EgoTask(Task):
    name = "ego"
    needs_ego = True

    def select_scenes(self, indices, ego_index, cfg):
        if cfg.scenes is not None:  # chosen by the caller: sim.reset names the one without an ego
            return indices
        kept = [i for i, e in zip(indices, ego_index, strict=True) if e >= 0]
        if not kept:
            raise NoEgoError(f"No scene of {cfg.dataset}/{cfg.split} has an ego candidate (a vehicle observed "
                             f"throughout); use trafficgym/SimAgents-v0, which needs none.")
        return kept

    def controlled(self, scenes, cfg):
        return "ego"

    def observation_space(self, cfg, chunk_points, num_agents):
        space = observation_space(cfg.obs, chunk_points)
        return flat_space(space) if cfg.obs.flat else space

    def action_shape(self, num_agents, action_dim):
        return (action_dim,)

    def checked_rows(self, state, active):
        return active.copy()

    def scatter(self, rows, state, out):
        out[torch.arange(state.batch_size, device=out.device), state.ego] = rows.to(out.device, out.dtype)
        return out

    def observe(self, state, cfg):
        obs = observe(state, state.ego[:, None], cfg.obs)
        obs = {k: v[:, 0] for k, v in obs.items()}
        if cfg.obs.flat:
            return flatten(obs)
        return obs

    def reward(self, per_agent, state):
        return per_agent[torch.arange(state.batch_size, device=per_agent.device), state.ego]

    def terminated(self, metrics, state, cfg):
        b = torch.arange(state.batch_size, device=state.device)
        term = torch.zeros(state.batch_size, dtype=torch.bool, device=state.device)
        if cfg.terminate_on_collision:
            term |= metrics["collision"][b, state.ego]
        if cfg.terminate_on_offroad:
            term |= metrics["offroad"][b, state.ego]
        return term

    def episode_stats(self, collided, offroad, progress, controlled, ego):
        return {"collision": float(collided[ego]), "offroad": float(offroad[ego]), "progress": float(progress[ego])}

    def info(self, b, state, host, pairs, per_agent):
        e = int(state.ego[b])
        mine = pairs[(pairs[:, 0] == b) & ((pairs[:, 1] == e) | (pairs[:, 2] == e))]
        return {"metrics": {k: float(v[b, e]) for k, v in host.items()},
                "collided_with": sorted({int(j if i == e else i) for _, i, j in mine})}


class SimAgentsTask(Task):
    name = "sim_agents"
    needs_ego = False

    def controlled(self, scenes, cfg):
        wanted = cfg.controlled
        if wanted == "all":
            return [np.ones(s.num_agents, bool) for s in scenes]
        if wanted == "vehicles":
            return [s.agent_type == AgentType.VEHICLE for s in scenes]
        return [np.isin(s.agent_ids, np.asarray(wanted, dtype=str)) for s in scenes]

    def observation_space(self, cfg, chunk_points, num_agents):
        from gymnasium import spaces

        if cfg.obs.flat:
            raise InvalidOptionError(
                "ObsConfig(flat=True) is the ego env's layout (one vector per observation); the sim-agents env "
                "observes every agent slot, so it keeps the Dict. Flatten each agent's entries yourself "
                "(gymnasium.spaces.flatten on one slot), or use trafficgym/Ego-v0.")
        space = observation_space(cfg.obs, chunk_points, prefix=(num_agents,))
        space.spaces["controlled"] = spaces.Box(0.0, 1.0, shape=(num_agents,), dtype=np.float32)
        return space

    def action_shape(self, num_agents, action_dim):
        return (num_agents, action_dim)

    def describe_action(self):
        return " per agent slot"

    def checked_rows(self, state, active):
        ctrl = (state.controlled & state.current_valid).cpu().numpy()
        return ctrl & active[:, None]

    def scatter(self, rows, state, out):
        out[:] = rows.to(out.device, out.dtype)
        return out

    def observe(self, state, cfg):
        observers = torch.arange(state.num_agents, device=state.device).expand(state.batch_size, -1)
        out = observe(state, observers, cfg.obs)
        live = (state.controlled & state.current_valid)[..., None]
        out = {k: v * live.reshape(*live.shape[:2], *([1] * (v.dim() - 2))) for k, v in out.items()}
        out["controlled"] = state.controlled.float()
        return out

    def reward(self, per_agent, state):
        ctrl = state.controlled.float()
        return (per_agent * ctrl).sum(-1) / ctrl.sum(-1).clamp(min=1)

    def terminated(self, metrics, state, cfg):
        return torch.zeros(state.batch_size, dtype=torch.bool, device=state.device)

    def episode_stats(self, collided, offroad, progress, controlled, ego):
        n = max(int(controlled.sum()), 1)
        return {"collision": float(collided[controlled].sum() / n), "offroad": float(offroad[controlled].sum() / n),
                "progress": float(progress[controlled].sum() / n)}

    def info(self, b, state, host, pairs, per_agent):
        return {"metrics": {k: v[b].copy() for k, v in host.items()},
                "agent_rewards": per_agent[b].cpu().numpy(),
                "collision_pairs": pairs[pairs[:, 0] == b][:, 1:].copy()}


TASKS: dict[str, type[Task]] = {"ego": EgoTask, "sim_agents": SimAgentsTask}


def make_task(name: str | Task) -> Task:
    """The task of a setting name (``"ego"``, ``"sim_agents"``); a ``Task`` instance passes through."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise UnknownNameError("task", name, TASKS)
    return TASKS[name]()
