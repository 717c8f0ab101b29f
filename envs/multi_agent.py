"""PettingZoo ``ParallelEnv`` view of the sim-agents env (needs the ``marl`` extra: ``pip install -e '.[marl]'``).

    from envs.multi_agent import parallel_env
    env = parallel_env(split="val")
    obs, infos = env.reset(seed=0)
    obs, rewards, terminations, truncations, infos = env.step({a: env.action_space(a).sample() for a in env.agents})

Agents are the scene's agent slots, named ``"agent_<slot>"`` (``possible_agents`` lists every slot); after
``reset`` the live agents are those the sim-agents setting controls (valid at the start step). All of them
leave together when the log ends (truncation). Observations and actions are those of ``trafficgym/Ego-v0``,
seen from each agent. The fast path is ``trafficgym/SimAgents-v0`` itself (padded arrays, one call).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.errors import EnvClosedError, InvalidActionError

try:
    from pettingzoo import ParallelEnv
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("envs.multi_agent needs PettingZoo: pip install -e '.[marl]' (or pip install pettingzoo).") from e


class TrafficParallelEnv(ParallelEnv):
    metadata = {"name": "trafficgym_sim_agents_v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, **kwargs: Any):
        from envs.traffic_env import SimAgentsEnv

        self._env = SimAgentsEnv(**kwargs)
        self._num_slots = self._env.engine.num_agents
        self.possible_agents = [f"agent_{i}" for i in range(self._num_slots)]
        self.agent_name_mapping = {name: i for i, name in enumerate(self.possible_agents)}
        full = self._env.observation_space
        self._single_obs_space = type(full)({k: _drop_first(v) for k, v in full.spaces.items() if k != "controlled"})
        self._single_action_space = _drop_first(self._env.action_space)
        self.agents: list[str] = []
        self.render_mode = None

    def observation_space(self, agent: str):
        # The same object every call, as PettingZoo expects.
        return self._single_obs_space

    def action_space(self, agent: str):
        return self._single_action_space

    def _split(self, obs: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        return {a: {k: v[self.agent_name_mapping[a]] for k, v in obs.items() if k != "controlled"}
                for a in self.agents}

    def reset(self, seed: int | None = None, options: dict | None = None):
        from envs.traffic_env import RESET_OPTIONS

        if self._env.closed:
            raise EnvClosedError("reset() on a closed env: close() was called. Make a new one (parallel_env).")
        # PettingZoo's API test passes arbitrary options; forward only the ones this env understands.
        known = {k: v for k, v in (options or {}).items() if k in RESET_OPTIONS}
        obs, info = self._env.reset(seed=seed, options=known or None)
        self.agents = [self.possible_agents[i] for i in np.flatnonzero(obs["controlled"] > 0)]
        return self._split(obs), {a: dict(info) for a in self.agents}

    def step(self, actions: dict[str, np.ndarray]):
        if self._env.closed:  # before the action checks: no action can help a closed env
            raise EnvClosedError("step() on a closed env: close() was called. Make a new one (parallel_env).")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise InvalidActionError(f"No action for live agents {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                                     f"every agent in env.agents needs one.")
        unknown = [a for a in actions if a not in self.agent_name_mapping]
        if unknown:
            raise InvalidActionError(f"Actions for unknown agents {unknown[:5]}; agents are named 'agent_<slot>'.")
        batch = np.zeros(self._env.action_space.shape, np.float32)
        for a in self.agents:
            batch[self.agent_name_mapping[a]] = actions[a]
        obs, _, terminated, truncated, info = self._env.step(batch)
        per_agent = info["agent_rewards"]
        live = list(self.agents)
        rewards = {a: float(per_agent[self.agent_name_mapping[a]]) for a in live}
        terminations = dict.fromkeys(live, bool(terminated))
        truncations = dict.fromkeys(live, bool(truncated))
        infos = {a: {"scene_id": info["scene_id"], "t": info["t"],
                     "metrics": {k: float(v[self.agent_name_mapping[a]]) for k, v in info["metrics"].items()}}
                 for a in live}
        observations = self._split(obs)
        if terminated or truncated:
            self.agents = []
        return observations, rewards, terminations, truncations, infos

    def close(self):
        self._env.close()


def _drop_first(space):
    """The per-agent space of a space stacked over agent slots (first axis dropped)."""
    from gymnasium import spaces

    return spaces.Box(space.low[0], space.high[0], dtype=space.dtype)


def parallel_env(**kwargs: Any) -> TrafficParallelEnv:
    """The PettingZoo view; keyword arguments are ``EnvConfig`` fields (as for ``gym.make``)."""
    return TrafficParallelEnv(**kwargs)
