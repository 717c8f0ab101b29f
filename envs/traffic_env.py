"""The Gymnasium environments: ``trafficgym/Ego-v0`` and ``trafficgym/SimAgents-v0``.

Both are thin stateful wrappers over ``TrafficEngine`` with one episode slot: the env keeps the engine (state,
spaces) and the RNG; all simulation happens in the pure functions of ``envs.sim``.
"""

from __future__ import annotations

import operator
from typing import Any

import gymnasium as gym
import numpy as np

from envs.config import EnvConfig
from envs.engine import TrafficEngine
from envs.errors import EnvClosedError, InvalidOptionError, ResetNeededError, SceneIndexError, UnknownNameError
from envs.observation import take_slot

RESET_OPTIONS = ("scene_id", "scene_index")


class HorizonSpec:
    """``spec.max_episode_steps`` is the env's real horizon: the most steps an episode can last (the longest
    selected scene's log after ``start_step``). The env truncates itself at the end of each scene's log, so no
    ``TimeLimit`` is registered or needed; the spec only tells generic code (and ``TimeAwareObservation``)
    the horizon. Needs ``self.engine``."""

    _spec = None

    @property
    def spec(self):
        return self._spec

    @spec.setter
    def spec(self, value):
        if value is not None and value.max_episode_steps is None:
            from dataclasses import replace

            value = replace(value, max_episode_steps=self.max_episode_steps)
        self._spec = value

    @property
    def max_episode_steps(self) -> int:
        """The most steps an episode can last (``spec.max_episode_steps``)."""
        return int(self.engine.num_steps - 1 - self.config.start_step)


class _TrafficEnv(HorizonSpec, gym.Env):
    # "human" is offered where a display exists: the instance's metadata drops it on headless machines, so
    # Gymnasium's env checker (which tries every declared mode) and wrappers see only what can work here.
    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": 10}
    _mode: str

    def __init__(self, config: EnvConfig | None = None, render_mode: str | None = None,
                 render_config: Any = None, **overrides: Any):
        """``render_config``: a ``render.renderer.RenderConfig`` for ``render()`` (default: 512x512, ego camera)."""
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UnknownNameError("render_mode", render_mode, self.metadata["render_modes"])
        if render_mode == "human":
            from render.display import require_display

            require_display()  # fail at construction, not after the first episode
        self.config = EnvConfig.from_kwargs(config, **overrides)
        self.render_mode = render_mode
        self.render_config = render_config
        self._window = None
        self.closed = False  # set by close(); a closed env refuses reset() and step() (as Gymnasium's vector envs)
        self.engine = TrafficEngine(self.config, num_slots=1, task=self._mode, single=True)
        self.observation_space = self.engine.observation_space()
        self.dict_observation_space = self.engine.dict_observation_space()  # before ObsConfig(flat=True)
        self.action_space = self.engine.action_space()
        from render.display import display_available

        modes = [m for m in self.metadata["render_modes"] if m != "human" or display_available()]
        self.metadata = {**self.metadata, "render_modes": modes, "render_fps": round(1.0 / self.engine.dataset.dt)}

    @property
    def scene_ids(self) -> list[str]:
        """The scenes this env draws from (in order; ``options={"scene_index": i}`` picks the i-th)."""
        return [self.engine.dataset.scene_ids[i] for i in self.engine.scene_indices]

    def _pick_scene(self, options: dict | None) -> int:
        options = options or {}
        for key in options:
            if key not in RESET_OPTIONS:
                raise UnknownNameError("reset option", key, RESET_OPTIONS)
        if "scene_id" in options:
            return scene_position(self.engine, options["scene_id"])
        if "scene_index" in options:
            return check_scene_index(options["scene_index"], len(self.engine.scene_indices))
        return int(self.np_random.integers(len(self.engine.scene_indices)))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """``options``: ``{"scene_id": id}`` or ``{"scene_index": i}`` (an int or numpy integer, not a float or
        bool) picks the scene; default a random one of ``scene_ids``."""
        if self.closed:
            raise EnvClosedError("reset() on a closed env: close() was called. Make a new env (gym.make) instead.")
        super().reset(seed=seed)
        position = self._pick_scene(options)
        self.engine.reset_slots(np.array([0]), np.array([position]))
        obs = take_slot(self.engine.observe(), 0)
        return obs, {"scene_id": self.engine.state.scene_ids[0], "t": int(self.engine.state.t[0])}

    def step(self, action):
        if self.closed:
            raise EnvClosedError("step() on a closed env: close() was called. Make a new env (gym.make) instead.")
        if self.engine.state is None:
            raise ResetNeededError("Call reset() before step().")
        if self.engine.done[0]:
            raise ResetNeededError("The episode has ended (terminated or truncated); call reset() before step().")
        reward, terminated, truncated, infos = self.engine.step(_add_batch_axis(action))
        obs = take_slot(self.engine.observe(), 0)
        return obs, float(reward[0]), bool(terminated[0]), bool(truncated[0]), infos[0]

    def render(self):
        """``rgb_array``: the current frame, ``uint8 (H, W, 3)`` (``render.renderer.render_frame``); ``human``:
        shows it in a window and returns None; no render mode: None."""
        if self.render_mode is None:
            return None
        from render.renderer import RenderConfig, render_engine  # lazy: pygame only for envs that render

        frame = render_engine(self.engine, 0, self.render_config or RenderConfig())
        if self.render_mode == "rgb_array":
            return frame
        if self._window is None:
            from render.display import HumanWindow

            self._window = HumanWindow(f"trafficgym {self.spec.id if self.spec else type(self).__name__}",
                                       self.metadata["render_fps"])
        self._window.show(frame)
        return None

    def close(self):
        if getattr(self, "_window", None) is not None:
            self._window.close()
            self._window = None
        self.closed = True
        super().close()

    @property
    def state(self):
        """The batched ``SimState`` (B = 1) of the running episode."""
        return self.engine.state


def scene_position(engine: TrafficEngine, scene_id) -> int:
    """The position of ``scene_id`` among the engine's selected scenes (``InvalidOptionError`` if it is not a
    string, ``UnknownNameError`` with the nearest ids if it is not one of them)."""
    if not isinstance(scene_id, str):
        raise InvalidOptionError(f"scene_id must be a string (a scene id), got {scene_id!r} "
                                 f"({type(scene_id).__name__}); use scene_index for a position in the env's scenes.")
    index = engine.dataset.index_of(scene_id)
    if index not in engine.scene_indices:
        raise UnknownNameError("scene id for this env", scene_id,
                               [engine.dataset.scene_ids[i] for i in engine.scene_indices],
                               fix="The env draws only from these (the scenes= option).")
    return engine.scene_indices.index(index)


def check_scene_index(value, count: int) -> int:
    """``value`` as a position among ``count`` scenes: an int or numpy integer in [0, count). Floats (even
    1.0) and bools are refused rather than truncated or read as 0 / 1."""
    i = _integer(value)
    if i is None:
        raise InvalidOptionError(f"scene_index must be an integer (int or numpy integer), got {value!r} "
                                 f"({type(value).__name__}). Pass int(...) if you mean to truncate, or scene_id "
                                 f"to pick a scene by name.")
    if not 0 <= i < count:
        raise SceneIndexError(f"scene_index {i} outside [0, {count}): the env has {count} scenes "
                              f"(its scene_ids).")
    return i


def _integer(value) -> int | None:
    """``value`` as an int if it is an integer type (``operator.index``: int, numpy integers), else None."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _add_batch_axis(action):
    """``action[None]`` for anything array-like; anything else passes through to get a clear error."""
    try:
        return np.asarray(action)[None]
    except (TypeError, ValueError):
        return action


class EgoEnv(_TrafficEnv):
    """``trafficgym/Ego-v0``: drive the ego (SDC) through a logged scene.

    Action: ``Box`` of the configured dynamics (default bicycle: acceleration m/s², curvature 1/m).
    Observation: ego-centric ``Dict`` (see ``envs.observation``). Reward: ``RewardConfig``. Terminated on ego
    collision / off-road (configurable); truncated at the end of the log. Other agents: log replay, or the
    ``traffic`` policy.
    """

    _mode = "ego"


class SimAgentsEnv(_TrafficEnv):
    """``trafficgym/SimAgents-v0``: control every agent valid at the start step (the WOSAC sim-agents setting).

    Action: ``Box (max_agents, action_dim)``; rows of agents that are not controlled are ignored (not bounds
    checked), but every row must be finite: NaN or inf anywhere raises ``InvalidActionError``.
    Observation: the ego-centric ``Dict`` of every agent slot stacked ``(max_agents, ...)``, plus
    ``controlled`` (max_agents,). Reward: mean per-agent reward over controlled agents (per-agent values in
    ``info["agent_rewards"]``). Never terminates early; truncated at the end of the log.
    """

    _mode = "sim_agents"

    def __init__(self, config: EnvConfig | None = None, render_mode: str | None = None,
                 render_config: Any = None, **overrides: Any):
        overrides.setdefault("terminate_on_collision", False)
        overrides.setdefault("terminate_on_offroad", False)
        super().__init__(config, render_mode, render_config, **overrides)
