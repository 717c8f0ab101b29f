"""The one agent interface: every policy (baselines, tokenized, diffusion, GMM ego) drives agents this way.

An agent acts on the batched ``SimState`` for the agents it is told to drive (a ``(B, A)`` mask) and returns
an ``Action`` in its declared ``dynamics``. It may plan several steps ahead and replan at its own rate
(``PlanningAgent``), and keeps whatever per-episode state it needs between ``reset`` and ``act`` calls.
Everything is batched over scenes and agents, deterministic given the ``reset`` seed, and runs on the
state's device.

    agent = make_agent("idm")
    agent.reset(state, mask, seed=0)
    action = agent.act(state, mask)          # Action(data (B, A, D), valid (B, A))
    state = sim.step(state, action, agent.dynamics)
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from envs.dynamics import Dynamics
from envs.policy import check_policy_action
from envs.types import Action, SimState


class Agent(ABC):
    """Base class. Subclasses set ``name`` and ``dynamics`` and implement ``act`` (and ``reset`` if they keep
    per-episode state).

    ``reset(state, mask, seed, slots)``: a new episode starts in the batch rows ``slots`` (all rows if None);
    ``mask`` ``(B, A)`` marks the agents this agent will drive there.
    ``act(state, mask)``: actions for the masked agents at the current step.
    """

    name: str = "agent"
    dynamics: Dynamics
    has_weights: bool = False

    def __init__(self) -> None:
        self.generator = torch.Generator()
        self.generator.manual_seed(0)

    def reset(self, state: SimState, mask: torch.Tensor, seed: int | None = None,
              slots: torch.Tensor | None = None) -> None:
        if seed is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(int(seed))

    @abstractmethod
    def act(self, state: SimState, mask: torch.Tensor) -> Action:
        """Actions ``(B, A, D)`` in ``self.dynamics`` for the agents in ``mask``; ``valid`` must equal ``mask``."""

    def __call__(self, state: SimState, mask: torch.Tensor) -> Action:
        """``act`` plus the output checks every caller relies on (shape, finiteness, mask)."""
        return check_policy_action(self, state, mask, self.act(state, mask))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dynamics={self.dynamics.name!r})"


class PlanningAgent(Agent):
    """An agent that plans ``horizon`` steps at once and replans every ``replan_every`` steps.

    Subclasses implement ``plan(state, mask) -> (B, A, horizon, D)``; ``act`` serves the plan step by step
    (per batch row, so rows reset at different times stay in sync with their own plans).
    """

    horizon: int = 5
    replan_every: int = 5

    def reset(self, state, mask, seed=None, slots=None):
        super().reset(state, mask, seed, slots)
        b = state.batch_size
        if getattr(self, "_plan", None) is None or self._plan.shape[0] != b or slots is None:
            self._plan = None
            self._age = torch.full((b,), 10**9, dtype=torch.long)
        else:
            self._age[slots.cpu()] = 10**9  # force a new plan in the reset rows

    @abstractmethod
    def plan(self, state: SimState, mask: torch.Tensor) -> torch.Tensor:
        """``(B, A, horizon, D)`` actions for the next ``horizon`` steps."""

    def act(self, state, mask):
        if getattr(self, "_age", None) is None or self._age.shape[0] != state.batch_size:
            self.reset(state, mask)
        stale = self._age >= self.replan_every
        if stale.any():
            fresh = self.plan(state, mask)
            if self._plan is None:
                self._plan = fresh.clone()
            else:
                rows = stale.to(fresh.device)
                self._plan[rows] = fresh[rows]
            self._age[stale] = 0
        step = self._age.clamp(max=self.horizon - 1).to(state.device)
        data = self._plan[torch.arange(state.batch_size, device=state.device), :, step]  # (B, A, D)
        self._age += 1
        return Action(data, mask.clone())
