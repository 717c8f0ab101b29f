"""Agent registry: ``register_agent`` adds a factory under a name, ``make_agent`` builds one by name.

Unknown names raise ``UnknownNameError`` with the nearest registered name; duplicate registrations are
refused; unknown config keys are named. The built-in agents register themselves on first use.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from agents.base import Agent
from envs.errors import CheckpointError, TrafficGymError, UnknownNameError

AGENTS: dict[str, Callable[..., Agent]] = {}
_BUILTIN_MODULES = ("agents.baselines", "agents.idm", "agents.smart", "agents.gmm_ego", "agents.ppo_mlp",
                    "agents.latent_diffusion")


def register_agent(name: str):
    """Class or factory decorator: ``@register_agent("idm")``."""

    def wrap(factory):
        if name in AGENTS:
            raise TrafficGymError(f"Agent {name!r} is already registered (by {AGENTS[name]!r}).")
        AGENTS[name] = factory
        if isinstance(factory, type):
            factory.name = name
        return factory

    return wrap


def _load_builtins() -> None:
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_agents() -> list[str]:
    _load_builtins()
    return sorted(AGENTS)


def make_agent(name: str | Agent, checkpoint: str | Path | None = None, **config) -> Agent:
    """Build a registered agent. ``checkpoint`` loads weights (agents that have them); ``config`` goes to the
    constructor (unknown keys raise with a suggestion). An ``Agent`` instance passes through unchanged."""
    if isinstance(name, Agent):
        if checkpoint is not None or config:
            raise TypeError("Pass checkpoint/config only with an agent name, not with an Agent instance.")
        return name
    _load_builtins()
    if name not in AGENTS:
        raise UnknownNameError("agent", name, AGENTS, fix="Register new agents with agents.registry.register_agent.")
    factory = AGENTS[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        known = [k for k in params if k != "self"]
        for key in config:
            if key not in known:
                raise UnknownNameError(f"config key for agent {name!r}", key, known)
    if checkpoint is not None:
        if not getattr(factory, "has_weights", False):
            raise CheckpointError(f"Agent {name!r} has no weights, so it takes no checkpoint (got {checkpoint}).")
        return factory.from_checkpoint(checkpoint, **config)
    return factory(**config)
