"""Episodes of the ego env, one per scene, for any driver: what PPO's validation, the reference returns of the
README (``benchmarks/ego_returns.py``) and the RL tables report.

A driver is an env-action function ``obs -> actions`` (e.g. an SB3 model's ``predict``), a registered agent or
its name (driven through ``AgentPolicy``: it reads the simulator state and acts in the env's action space), or
one of the reference drivers ``"zero"`` (action 0: keep speed, go straight) and ``"random"`` (uniform over the
action space). Every scene runs once in one native vector env (all scenes in one batch), deterministic given
``seed``; the statistics are the env's own ``info["episode_stats"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

REFERENCE_DRIVERS = ("zero", "random")
EPISODE_KEYS = ("return", "length", "collision", "offroad", "progress")


def spread(count: int, total: int) -> list[int]:
    """``count`` scene positions spread evenly over ``total`` (all of them if ``count`` >= ``total``)."""
    if count >= total:
        return list(range(total))
    return sorted({int(i) for i in np.linspace(0, total - 1, count).round()})


def ego_episodes(driver: Any, scenes: int | None = None, seed: int = 0, **env_kwargs) -> dict[str, np.ndarray]:
    """One ego episode per scene (``scenes`` spread over the split, default all) -> ``{key: (N,) array}`` for
    ``EPISODE_KEYS`` plus ``scene_id``. ``env_kwargs`` make the env (``split``, ``traffic``, ``obs``, ...)."""
    import gymnasium as gym

    import envs  # noqa: F401  (registers the ids)

    probe = gym.make_vec("trafficgym/Ego-v0", num_envs=1, vectorization_mode="vector_entry_point", **env_kwargs)
    positions = spread(scenes or len(probe.unwrapped.engine.scene_indices), len(probe.unwrapped.engine.scene_indices))
    probe.close()
    n = len(positions)
    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=n, vectorization_mode="vector_entry_point", **env_kwargs)
    act = _driver(driver, venv, seed)
    obs, info = venv.reset(seed=seed, options={"scene_index": positions})
    ids = np.asarray(info["scene_id"])
    out = {k: np.zeros(n) for k in EPISODE_KEYS}
    done = np.zeros(n, bool)
    while not done.all():
        obs, _, term, trunc, info = venv.step(act(obs))
        for i in np.flatnonzero((term | trunc) & ~done):
            for k in EPISODE_KEYS:
                out[k][i] = info["episode_stats"][k][i]
        done |= term | trunc
    venv.close()
    out["scene_id"] = ids
    return out


def summarize(episodes: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over the episodes (``collision`` / ``offroad``: the fraction of episodes) and the return's spread."""
    out = {k: float(np.mean(episodes[k])) for k in EPISODE_KEYS}
    out["return_std"] = float(np.std(episodes["return"]))
    out["episodes"] = len(episodes["return"])
    return out


def _driver(driver: Any, venv, seed: int) -> Callable[[Any], np.ndarray]:
    space = venv.action_space
    if isinstance(driver, str) and driver in REFERENCE_DRIVERS:
        if driver == "zero":
            return lambda obs: np.zeros(space.shape, np.float32)
        rng = np.random.default_rng(seed)
        return lambda obs: rng.uniform(space.low, space.high).astype(np.float32)
    if callable(driver) and not hasattr(driver, "act"):
        return driver
    from agents.env_policy import AgentPolicy

    return AgentPolicy(venv, driver, seed=seed)
