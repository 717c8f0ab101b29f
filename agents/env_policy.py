"""A registered agent as the policy of a trafficgym env: ``AgentPolicy(env, agent)(obs) -> action``.

An agent acts on the simulator state in its own dynamics (the tokenized policy in poses, ``gmm_ego`` and IDM in
bicycle actions); an env takes actions in *its* dynamics and scale (``dynamics=``, ``action_scale=``). The
adapter reads the env's state, lets the agent act for the agents the env controls, plays that action through
the agent's dynamics to the next state and turns the step into the env's action with the env dynamics'
``inverse`` (exact for the bicycle and delta dynamics on the bicycle's own motion, tested), scaled to the env's
action space. So a learned ego and a user's RL policy drive the same env in one loop::

    env = gym.make("trafficgym/Ego-v0", traffic="idm")
    expert = AgentPolicy(env, make_agent("gmm_ego", checkpoint="towns-gmm"))
    obs, info = env.reset(seed=0)
    while True:
        obs, reward, terminated, truncated, info = env.step(expert(obs))
        if terminated or truncated:
            break

Works with the single envs, their native vector envs (autoreset slots restart the agent's episode in those
slots) and the PettingZoo view's engine. The agent's episode starts whenever a slot is at the env's first
controlled step.
"""

from __future__ import annotations

import numpy as np
import torch

from envs.dynamics import to_normalized
from envs.errors import ResetNeededError


class AgentPolicy:
    """``agent`` (an ``agents.base.Agent`` or a registered name) choosing ``env``'s actions."""

    def __init__(self, env, agent, seed: int = 0):
        from agents.registry import make_agent

        engine = getattr(env.unwrapped, "engine", None)
        if engine is None:
            from envs.errors import InvalidOptionError

            raise InvalidOptionError(f"{env!r} is not a trafficgym env (no engine): AgentPolicy drives the "
                                     "trafficgym/Ego-v0 and SimAgents-v0 envs and their vector envs.")
        self.engine, self.agent, self.seed = engine, make_agent(agent), seed
        self._started = False

    def __call__(self, observation=None) -> np.ndarray:
        """The env's action for the current state (``observation`` is not needed: the agent reads the state)."""
        eng = self.engine
        st = eng.state
        if st is None:
            raise ResetNeededError("Reset the env before asking AgentPolicy for an action.")
        mask = st.controlled & st.agent_mask
        starting = st.t == eng.cfg.start_step
        with torch.inference_mode():  # resets too: the agent's per-episode tensors are made under it
            if not self._started:
                self.agent.reset(st, mask, seed=self.seed)
                self._started = True
            elif bool(starting.any()):
                self.agent.reset(st, mask, slots=starting.nonzero().squeeze(-1))
            action = self.agent(st, mask)
            nxt = self.agent.dynamics.forward(st.current, action.data.to(st.current.dtype), float(st.dt))
            phys = eng.dynamics.inverse(st.current, nxt, float(st.dt))  # (B, A, D) in the env's dynamics
        phys = torch.where(mask[..., None], phys, torch.zeros_like(phys))
        if eng.task.name == "ego":
            phys = phys[torch.arange(st.batch_size, device=phys.device), st.ego]  # (B, D)
        arr = phys.cpu().numpy().astype(np.float32)
        arr = np.clip(arr, eng.physical_low, eng.physical_high)
        if eng.cfg.action_scale == "normalized":
            arr = to_normalized(arr, eng.physical_low, eng.physical_high)
        return arr[0] if eng.single else arr

    def __repr__(self) -> str:
        return f"AgentPolicy({self.agent!r})"
