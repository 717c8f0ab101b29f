"""Native Gymnasium vector envs: N scenes stepped in one batched ``SimState`` (no subprocesses, no copies).

    envs = gym.make_vec("trafficgym/Ego-v0", num_envs=64, vectorization_mode="vector_entry_point", split="val")

Autoreset follows Gymnasium's modes: ``NEXT_STEP`` (default: the step after an episode ends resets that env
and returns its first observation with reward 0) or ``SAME_STEP`` (the ending step already returns the next
episode's first observation; the last one is in ``info["final_obs"]``). ``SB3VecEnv`` adapts the latter to
stable-baselines3's ``VecEnv`` so its algorithms train on it directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs.config import EnvConfig
from envs.engine import TrafficEngine
from envs.errors import EnvClosedError, InvalidOptionError, ResetNeededError, UnknownNameError
from envs.observation import take_slot
from envs.traffic_env import HorizonSpec, check_scene_index, scene_position

VECTOR_RESET_OPTIONS = ("scene_index", "scene_id")
RAGGED_INFOS = ("collision_pairs",)  # per-env info arrays whose shape differs between envs


class _TrafficVectorEnv(HorizonSpec, VectorEnv):
    _mode: str
    # Like SyncVectorEnv: render() returns one frame per sub-env (a tuple). No window mode for the batch.
    metadata = {"render_modes": ["rgb_array"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int, config: EnvConfig | None = None, render_mode: str | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, render_config: Any = None,
                 **overrides: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UnknownNameError("render_mode", render_mode, self.metadata["render_modes"],
                                   fix="Vector envs render rgb_array frames (one per env); show them yourself.")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}.")
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        if self.autoreset_mode == AutoresetMode.DISABLED:
            raise ValueError("autoreset_mode DISABLED is not supported; use NEXT_STEP or SAME_STEP.")
        if self._mode == "sim_agents":
            overrides.setdefault("terminate_on_collision", False)
            overrides.setdefault("terminate_on_offroad", False)
        self.config = EnvConfig.from_kwargs(config, **overrides)
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.render_config = render_config
        self.engine = TrafficEngine(self.config, num_slots=num_envs, task=self._mode)
        self.single_observation_space = self.engine.observation_space()
        self.dict_observation_space = self.engine.dict_observation_space()  # one env's, before flattening
        self.single_action_space = self.engine.action_space()
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode,
                         "render_fps": round(1.0 / self.engine.dataset.dt)}
        self._needs_reset = np.zeros(num_envs, bool)

    def _scene_positions(self, options: dict | None, count: int) -> np.ndarray:
        options = options or {}
        for key in options:
            if key not in VECTOR_RESET_OPTIONS:
                raise UnknownNameError("reset option", key, VECTOR_RESET_OPTIONS)
        n_scenes = len(self.engine.scene_indices)
        if "scene_id" in options:
            ids = options["scene_id"]
            # One id (a string, which list() would split into characters) means that scene in every env.
            ids = [ids] * count if isinstance(ids, str) else list(ids)
            _check_count("scene_id", ids, count)
            positions = [scene_position(self.engine, i) for i in ids]
        elif "scene_index" in options:
            # One index means that scene in every env; check_scene_index refuses floats and bools (dtype=object
            # keeps each entry's own type: 1.5 stays a float instead of turning [0, 1.5] into a float array).
            raw = np.asarray(options["scene_index"], dtype=object)
            values = [raw.item()] * count if raw.ndim == 0 else list(raw.reshape(-1))
            _check_count("scene_index", values, count)
            positions = [check_scene_index(v, n_scenes) for v in values]
        else:
            return self.np_random.integers(n_scenes, size=count)
        return np.asarray(positions, np.int64)

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        """``options`` picks the scenes: ``{"scene_id": ids}`` or ``{"scene_index": indices}``, a sequence with
        one entry per env, or a single id (a string) / a single index for the same scene in every env. Indices
        are ints or numpy integers (floats and bools are refused). Default: random scenes."""
        if self.closed:
            raise EnvClosedError("reset() on a closed vector env: close() was called. Make a new one (gym.make_vec).")
        if isinstance(seed, list | tuple):
            seed = seed[0]  # one RNG drives scene choice for the whole batch
        if seed is not None:
            from gymnasium.utils import seeding

            self._np_random, self._np_random_seed = seeding.np_random(seed)
        positions = self._scene_positions(options, self.num_envs)
        self.engine.reset_slots(np.arange(self.num_envs), positions)
        self._needs_reset[:] = False
        infos: dict = {}
        for i in range(self.num_envs):
            infos = self._add_info(infos, {"scene_id": self.engine.state.scene_ids[i]}, i)
        return self.engine.observe(), infos

    def step(self, actions):
        if self.closed:
            raise EnvClosedError("step() on a closed vector env: close() was called. Make a new one (gym.make_vec).")
        if self.engine.state is None:
            raise ResetNeededError("Call reset() before step().")
        n = self.num_envs
        resetting = self._needs_reset.copy()
        active = ~resetting
        reward = np.zeros(n)
        terminated = np.zeros(n, bool)
        truncated = np.zeros(n, bool)
        infos: dict = {}
        if active.any():
            r, term, trunc, step_infos = self.engine.step(actions, active=active)
            reward[active], terminated[active], truncated[active] = r[active], term[active], trunc[active]
            for i in np.flatnonzero(active):
                infos = self._add_info(infos, step_infos[i], i)
        if resetting.any():  # NEXT_STEP: envs that ended last step start over now
            self.engine.reset_slots(np.flatnonzero(resetting), self._scene_positions(None, int(resetting.sum())))
        ended = terminated | truncated
        if self.autoreset_mode == AutoresetMode.SAME_STEP and ended.any():
            final = self.engine.observe()
            for i in np.flatnonzero(ended):
                infos = self._add_info(infos, {"final_obs": take_slot(final, i),
                                               "final_info": {"scene_id": self.engine.state.scene_ids[i]}}, i)
            self.engine.reset_slots(np.flatnonzero(ended), self._scene_positions(None, int(ended.sum())))
            self._needs_reset[:] = False
        else:
            self._needs_reset = ended
        return self.engine.observe(), reward, terminated, truncated, infos

    def _add_info(self, vector_infos: dict, env_info: dict, env_num: int) -> dict:
        # Gymnasium stacks array infos into one (num_envs, ...) array, which fails when their shapes differ
        # between envs: collision_pairs is (pairs, 2) per env. Those go into an object array, one per env.
        ragged = {k: env_info[k] for k in RAGGED_INFOS if k in env_info}
        vector_infos = super()._add_info(vector_infos, {k: v for k, v in env_info.items() if k not in ragged},
                                         env_num)
        for key, value in ragged.items():
            if key not in vector_infos:
                vector_infos[key] = np.full(self.num_envs, None, dtype=object)
                vector_infos[f"_{key}"] = np.zeros(self.num_envs, dtype=bool)
            vector_infos[key][env_num] = value
            vector_infos[f"_{key}"][env_num] = True
        return vector_infos

    def render(self):
        """``rgb_array``: a tuple of ``uint8 (H, W, 3)`` frames, one per env (as Gymnasium's SyncVectorEnv)."""
        if self.render_mode is None:
            return None
        from render.renderer import RenderConfig, render_engine  # lazy: pygame only for envs that render

        config = self.render_config or RenderConfig()
        return tuple(render_engine(self.engine, i, config) for i in range(self.num_envs))

    @property
    def state(self):
        return self.engine.state


def _check_count(option: str, values: list, count: int) -> None:
    if len(values) != count:
        raise InvalidOptionError(f"Reset option {option} names {len(values)} scenes for {count} envs: {values!r}. "
                                 f"Give one per env, or a single one for every env.")


class EgoVectorEnv(_TrafficVectorEnv):
    """Vector version of ``trafficgym/Ego-v0``."""

    _mode = "ego"


class SimAgentsVectorEnv(_TrafficVectorEnv):
    """Vector version of ``trafficgym/SimAgents-v0``."""

    _mode = "sim_agents"


def SB3VecEnv(env: _TrafficVectorEnv):  # noqa: N802 (a factory that reads like the class it returns)
    """Wrap a trafficgym vector env (``SAME_STEP`` autoreset) as a stable-baselines3 ``VecEnv``.

    >>> venv = SB3VecEnv(gym.make_vec("trafficgym/Ego-v0", num_envs=8, vectorization_mode="vector_entry_point",
    ...                               autoreset_mode="SameStep", obs={"flat": True, "normalize": True}))
    >>> PPO("MlpPolicy", venv).learn(10_000)

    Episode statistics come built in, as SB3's ``Monitor`` / ``VecMonitor`` write them: the info of an episode's
    last step holds ``"episode": {"r": return, "l": length, "t": seconds since the adapter was made}`` plus the
    env's own ``collision``, ``offroad`` (0/1) and ``progress`` (m) of that episode, so SB3 logs
    ``ep_rew_mean`` / ``ep_len_mean`` without a wrapper, and ``env_is_wrapped(Monitor)`` answers True (which
    tells ``evaluate_policy`` to trust those returns). ``get_images`` returns one frame per env from a vector env
    made with ``render_mode="rgb_array"``.
    """
    import time

    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import VecEnv

    class _Adapter(VecEnv):
        def __init__(self, venv: _TrafficVectorEnv):
            inner = venv.unwrapped
            if not isinstance(inner, _TrafficVectorEnv):
                raise InvalidOptionError(f"SB3VecEnv wraps a trafficgym vector env (gym.make_vec(..., vectorization_"
                                         f"mode='vector_entry_point')), got {venv!r}.")
            if inner.autoreset_mode != AutoresetMode.SAME_STEP:
                raise ValueError("SB3VecEnv needs a vector env made with autoreset_mode='SameStep' (SB3 resets "
                                 "finished envs inside the same step).")
            self.venv, self.wrapped = inner, venv
            super().__init__(inner.num_envs, inner.single_observation_space, inner.single_action_space)
            self._actions = None
            self._t0 = time.time()

        def reset(self):
            obs, _ = self.venv.reset(seed=self._seeds[0] if any(s is not None for s in self._seeds) else None)
            self._reset_seeds()
            return obs

        def step_async(self, actions):
            self._actions = actions

        def step_wait(self):
            obs, reward, terminated, truncated, infos = self.venv.step(self._actions)
            done = terminated | truncated
            out = [{} for _ in range(self.num_envs)]
            stats = infos.get("episode_stats", {})
            for i in range(self.num_envs):
                out[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
                if done[i]:
                    out[i]["terminal_observation"] = take_slot(infos["final_obs"], i)
                    out[i]["episode"] = {"r": float(stats["return"][i]), "l": int(stats["length"][i]),
                                         "t": round(time.time() - self._t0, 6),
                                         **{k: float(stats[k][i]) for k in ("collision", "offroad", "progress")}}
                if "metrics" in infos and infos.get("_metrics", np.zeros(self.num_envs, bool))[i]:
                    out[i]["metrics"] = {k: v[i] for k, v in infos["metrics"].items() if not k.startswith("_")}
            return obs, reward.astype(np.float32), done, out

        def close(self):
            self.venv.close()

        def get_attr(self, attr_name, indices=None):
            return [getattr(self.venv, attr_name)] * len(self._get_indices(indices))

        def set_attr(self, attr_name, value, indices=None):
            setattr(self.venv, attr_name, value)

        def env_method(self, method_name, *args, indices=None, **kwargs):
            return [getattr(self.venv, method_name)(*args, **kwargs)] * len(self._get_indices(indices))

        def env_is_wrapped(self, wrapper_class, indices=None):
            """True for ``Monitor`` (the adapter records episodes as it does) and for any Gymnasium vector wrapper
            class around the wrapped env; else False."""
            wrapped, env = issubclass(wrapper_class, Monitor), self.wrapped
            while not wrapped and env is not self.venv and hasattr(env, "env"):
                wrapped, env = isinstance(env, wrapper_class), env.env
            return [wrapped] * len(self._get_indices(indices))

        def get_images(self):
            if self.venv.render_mode != "rgb_array":
                raise InvalidOptionError(
                    f"get_images needs frames: make the vector env with render_mode='rgb_array' (it has "
                    f"render_mode={self.venv.render_mode!r}), e.g. gym.make_vec(..., render_mode='rgb_array').")
            return list(self.venv.render())

    return _Adapter(env)
