"""What a policy is, to the env: the ``Policy`` protocol, the one check of what a policy returns, and the
resolution of policy names through a string entry point.

The env never imports agent code: a name (``EnvConfig.traffic="idm"``) resolves through ``POLICY_RESOLVER``, the
entry point ``"module:attribute"`` of a factory ``f(name) -> Policy`` (by default the agent registry,
``agents.registry.make_agent``), imported the first time a name is used. ``register_policy`` adds a name of your
own by entry point (``register_policy("mine", "mypkg.policies:MyPolicy")``) without touching that registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from envs.errors import InvalidActionError, TrafficGymError
from envs.types import Action, SimState

POLICY_RESOLVER = "agents.registry:make_agent"  # f(name) -> Policy for every name not registered here
_ENTRY_POINTS: dict[str, str | Callable] = {}


@runtime_checkable
class Policy(Protocol):
    """Drives the agents of a ``(B, A)`` mask: ``act(state, mask) -> Action`` in its ``dynamics`` (an
    ``envs.dynamics.Dynamics``; ``action_dim`` wide). Optional: ``name``, and ``reset(state, mask, seed=None,
    slots=None)`` at the start of episodes in the batch rows ``slots``."""

    dynamics: object

    def act(self, state: SimState, mask: torch.Tensor) -> Action: ...


def load_entry_point(entry_point: str) -> Callable:
    """The attribute named by ``"package.module:attribute"``; ``TrafficGymError`` naming what is missing."""
    module, sep, attr = entry_point.partition(":")
    if not sep or not module or not attr:
        raise TrafficGymError(f"Entry point {entry_point!r} must read 'package.module:attribute'.")
    try:
        target = importlib.import_module(module)
    except ImportError as e:
        raise TrafficGymError(f"Entry point {entry_point!r}: cannot import {module!r} ({e}).") from e
    if not hasattr(target, attr):
        raise TrafficGymError(f"Entry point {entry_point!r}: module {module!r} has no attribute {attr!r}.")
    return getattr(target, attr)


def register_policy(name: str, entry_point: str | Callable) -> None:
    """Make ``name`` resolve to ``entry_point`` (``"module:attribute"``, imported on first use, or a callable);
    either returns a ``Policy`` when called with no arguments. Names already registered are refused."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"A policy name must be a non-empty string, got {name!r}.")
    if name in _ENTRY_POINTS:
        raise TrafficGymError(f"Policy {name!r} is already registered (as {_ENTRY_POINTS[name]!r}).")
    if not isinstance(entry_point, str) and not callable(entry_point):
        raise TypeError(f"register_policy({name!r}, ...): the entry point must be 'module:attribute' or a callable, "
                        f"got {type(entry_point).__name__}.")
    _ENTRY_POINTS[name] = entry_point


def make_policy(name: str) -> Policy:
    """The policy a name stands for: a ``register_policy`` entry, else ``POLICY_RESOLVER(name)`` (the agent
    registry: unknown names raise ``UnknownNameError`` with the nearest registered one)."""
    if name in _ENTRY_POINTS:
        factory = _ENTRY_POINTS[name]
        policy = (load_entry_point(factory) if isinstance(factory, str) else factory)()
    else:
        policy = load_entry_point(POLICY_RESOLVER)(name)
    if not isinstance(policy, Policy):
        raise TypeError(f"Policy {name!r} resolved to {type(policy).__name__}, which has no act(state, mask) and "
                        "dynamics attribute.")
    return policy


def check_policy_action(policy, state: SimState, mask: torch.Tensor, action) -> Action:
    """The action a policy returned, restricted to ``mask``; ``InvalidActionError`` naming the policy if it has the
    wrong type or shape, or NaN/inf for agents it drives."""
    name = getattr(policy, "name", type(policy).__name__)
    dynamics = policy.dynamics
    expected = (state.batch_size, state.num_agents, dynamics.action_dim)
    if not isinstance(action, Action):
        raise InvalidActionError(f"Policy {name!r} returned {type(action).__name__}, expected envs.types.Action.")
    if tuple(action.data.shape) != expected:
        raise InvalidActionError(f"Policy {name!r} returned actions of shape {tuple(action.data.shape)}, expected "
                                 f"{expected} ({dynamics.name} dynamics).")
    if tuple(action.valid.shape) != expected[:2]:
        raise InvalidActionError(f"Policy {name!r} returned a valid mask of shape {tuple(action.valid.shape)}, "
                                 f"expected {expected[:2]}.")
    driven = action.valid & mask
    if not torch.isfinite(action.data[driven]).all():
        raise InvalidActionError(f"Policy {name!r} returned NaN or inf actions for agents it drives.")
    remove = None if action.remove is None else action.remove & driven
    return Action(action.data, driven, remove)
