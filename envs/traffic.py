"""Who drives the agents the env does not control: log replay, or one or several policies by rule.

``EnvConfig.traffic`` accepts
- ``"log"``: every uncontrolled agent replays its log (default);
- a registered agent name (``"idm"``) or a policy object: it drives every uncontrolled agent;
- a list of ``(policy, selector)`` rules, first match wins, unmatched agents replay their log. Selectors:
  ``"all"``, ``"vehicles"``, ``"non_vehicles"``, or a number ``r``: agents within ``r`` metres of the ego at
  the start of the episode. Example: ``[("smart", 30.0), ("idm", "vehicles")]`` — learned agents near the
  ego, IDM for other vehicles, log replay for everyone else.

A policy object satisfies ``envs.policy.Policy`` (``act(state, mask) -> Action`` and a ``dynamics`` attribute;
``agents.base.Agent`` provides both plus ``reset``). Names resolve through ``envs.policy.make_policy``: the env
never imports agent code to know what a policy is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from envs.errors import UnknownNameError
from envs.policy import Policy, make_policy
from envs.types import AgentType, SimState

SELECTORS = ("all", "vehicles", "non_vehicles")
LOG = "log"


@dataclass(frozen=True)
class TrafficRule:
    policy: Any
    select: str | float
    name: str


def _policy(spec) -> tuple[Any, str]:
    if isinstance(spec, str):
        return make_policy(spec), spec
    if not isinstance(spec, Policy):
        raise TypeError(f"A traffic policy must be 'log', a registered agent name, or an object with "
                        f"act(state, mask) and a dynamics attribute; got {type(spec).__name__}.")
    return spec, getattr(spec, "name", type(spec).__name__)


def resolve_traffic(spec) -> list[TrafficRule]:
    """Normalise ``EnvConfig.traffic`` into rules (empty: log replay for everyone)."""
    if isinstance(spec, str) and spec == LOG:
        return []
    if isinstance(spec, list | tuple) and spec and all(isinstance(r, list | tuple) and len(r) == 2 for r in spec):
        rules = []
        for policy, select in spec:
            if isinstance(select, str) and select not in SELECTORS:
                raise UnknownNameError("traffic selector", select, SELECTORS, fix="Or a radius in metres.")
            if not isinstance(select, str) and not (isinstance(select, int | float) and select > 0):
                raise ValueError(f"Traffic selector {select!r} must be one of {SELECTORS} or a radius > 0 m.")
            if isinstance(policy, str) and policy == LOG:
                rules.append(TrafficRule(None, select, LOG))
                continue
            agent, name = _policy(policy)
            rules.append(TrafficRule(agent, float(select) if not isinstance(select, str) else select, name))
        return rules
    agent, name = _policy(spec)
    return [TrafficRule(agent, "all", name)]


def assign(state: SimState, rules: list[TrafficRule]) -> torch.Tensor:
    """``(B, A)`` long: index of the rule driving each uncontrolled agent, -1 for log replay / controlled /
    padding. Evaluated at the current (start) step."""
    out = torch.full((state.batch_size, state.num_agents), -1, dtype=torch.long, device=state.device)
    free = state.agent_mask & ~state.controlled
    vehicle = state.agent_type == AgentType.VEHICLE
    b = torch.arange(state.batch_size, device=state.device)
    ego_xy = state.current[b, state.ego, :2]
    dist = (state.current[..., :2] - ego_xy[:, None]).norm(dim=-1)
    for k, rule in enumerate(rules):
        if rule.select == "all":
            chosen = free.clone()
        elif rule.select == "vehicles":
            chosen = free & vehicle
        elif rule.select == "non_vehicles":
            chosen = free & ~vehicle
        else:
            chosen = free & (dist <= rule.select) & state.current_valid
        take = chosen & (out < 0)
        out[take] = k
    return out


def driven_by_names(assignment: np.ndarray, controlled: np.ndarray, agent_mask: np.ndarray,
                    rules: list[TrafficRule], controller: str = "env") -> np.ndarray:
    """``(A,)`` object array naming what drives each agent slot of one scene: ``controller`` for the agents the
    env's caller controls, a policy name, ``"log"``, or ``""`` for padding."""
    names = np.array([LOG] * len(assignment), dtype=object)
    for k, rule in enumerate(rules):
        names[assignment == k] = rule.name
    names[controlled] = controller
    names[~agent_mask] = ""
    return names
