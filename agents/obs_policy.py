"""Any policy of the ego env's observations as an agent: ``ObservationPolicyAgent(policy, obs=ObsConfig(...))``.

An RL policy is trained on what ``trafficgym/Ego-v0`` shows it: an observation (``envs.observation``, with the
``ObsConfig`` it was trained with) and an action in the env's action space (the dynamics' physical units, or
[-1, 1] with ``action_scale="normalized"``). Agents act on the simulator state instead. The adapter closes the gap:
for every agent it is told to drive it builds that agent's observation exactly as the ego env builds the ego's
(each agent observes from its own box, with its own logged route), calls the policy once on the whole batch,
and maps the actions back to physical units. So a policy trained in the env drives in ``trafficgym eval
--setting ego``, ``trafficgym render`` and as traffic, and is compared with every other agent on the same
metrics::

    from stable_baselines3 import PPO
    model = PPO.load("my_run.zip")
    agent = ObservationPolicyAgent(lambda obs: model.predict(obs, deterministic=True)[0],
                                   obs=ObsConfig(flat=True, normalize=True))

The policy takes a batch of observations (``(N, F)`` float32 for ``flat`` configs, else a dict of ``(N, ...)``
arrays, numpy) and returns ``(N, D)`` actions (numpy or torch). Actions outside the action space are clipped to
it, as SB3 and the env's ``action_bounds="clip"`` do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from agents.base import Agent
from envs.dynamics import from_normalized, make_dynamics
from envs.errors import UnknownNameError
from envs.observation import ObsConfig, flatten, observe
from envs.types import Action, SimState

ACTION_SCALES = ("normalized", "physical")


def observers_of(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, O)`` agent indices of each row's masked agents (padded with 0) and ``(B, O)`` which are real, with O
    the most masked agents of any row (at least 1)."""
    counts = mask.sum(-1)
    width = max(int(counts.max()) if mask.numel() else 0, 1)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :width]  # masked agents first
    real = torch.arange(width, device=mask.device)[None] < counts[:, None]
    return torch.where(real, order, torch.zeros_like(order)), real


class ObservationPolicyAgent(Agent):
    """Drives the masked agents with ``policy`` of their env observations (see the module docstring).

    ``obs``: the ``ObsConfig`` the policy was trained with; ``dynamics``: the env dynamics of its actions
    (``"bicycle"`` default); ``action_scale``: ``"normalized"`` (default, the env's default) or ``"physical"``.
    """

    name = "observation_policy"

    def __init__(self, policy: Callable, obs: ObsConfig | None = None, dynamics: str = "bicycle",
                 action_scale: str = "normalized"):
        super().__init__()
        if not callable(policy):
            raise TypeError(f"policy must be callable (observations -> actions), got {type(policy).__name__}.")
        if action_scale not in ACTION_SCALES:
            raise UnknownNameError("action_scale", action_scale, ACTION_SCALES)
        self.policy, self.obs = policy, obs or ObsConfig()
        self.dynamics = make_dynamics(dynamics)
        if action_scale == "normalized" and self.dynamics.name == "pose":
            raise ValueError("action_scale='normalized' does not apply to 'pose' dynamics; use 'physical'.")
        self.action_scale = action_scale
        low, high = self.dynamics.bounds()
        self._low, self._high = low.numpy(), high.numpy()

    def observe(self, state: SimState, mask: torch.Tensor):
        """The env observations of the masked live agents, batched ``(N, ...)`` numpy (row order: by scene, then
        agent index), and the ``(N,)`` scene and agent index of each row."""
        sel = mask & state.current_valid & state.agent_mask
        observers, real = observers_of(sel)
        with torch.inference_mode():
            obs = observe(state, observers, self.obs)
            if self.obs.flat:
                obs = flatten(obs, batch_dims=2)
                rows = obs[real].cpu().numpy().astype(np.float32, copy=False)
            else:
                rows = {k: v[real].cpu().numpy().astype(np.float32, copy=False) for k, v in obs.items()}
        b = torch.arange(state.batch_size, device=state.device)[:, None].expand_as(observers)
        return rows, b[real], observers[real]

    def act(self, state, mask):
        data = torch.zeros(*mask.shape, self.dynamics.action_dim, device=state.device, dtype=state.current.dtype)
        rows, b, a = self.observe(state, mask)
        if len(b):
            out = self.policy(rows)
            out = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
            expected = (len(b), self.dynamics.action_dim)
            if out.shape != expected:
                raise ValueError(f"The policy returned actions of shape {out.shape} for {len(b)} observations; "
                                 f"expected {expected} ({self.dynamics.name}: "
                                 f"{', '.join(self.dynamics.action_names)}).")
            out = out.astype(np.float32)
            if self.action_scale == "normalized":
                out = from_normalized(np.clip(out, -1.0, 1.0), self._low, self._high)
            else:
                out = np.clip(out, self._low, self._high)
            data[b, a] = torch.as_tensor(out, device=state.device, dtype=data.dtype)
        return Action(data, mask.clone())
