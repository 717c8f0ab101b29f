"""Environment configuration: one frozen dataclass, validated on construction, overridable by keyword."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from envs.errors import UnknownNameError, check_kwargs
from envs.observation import ObsConfig
from envs.rewards import RewardConfig

ACTION_BOUNDS_MODES = ("raise", "clip")
ACTION_SCALES = ("normalized", "physical")
CONTROLLED_MODES = ("all", "vehicles")


@dataclass(frozen=True)
class EnvConfig:
    """Everything that defines an environment. Pass as ``gym.make(id, config=EnvConfig(...))`` and/or override
    fields by keyword: ``gym.make(id, split="val", dynamics="delta_local")``.

    Attributes:
        dataset, split, data_dir, cache_dir, case_length: which scenes (see ``envs.data.open_dataset``).
        scenes: restrict to these scene ids (default: every scene of the split).
        start_step: the step at which control starts; earlier steps are logged history (WOSAC: 10).
        dynamics: ``"bicycle"`` (acceleration, curvature), ``"delta_local"`` or ``"pose"``.
        action_scale: ``"normalized"`` (default except for ``pose`` dynamics): the action space is [-1, 1] per
            dimension, mapped piecewise-linearly onto [low, 0, high] of the dynamics' physical bounds, so 0 means
            "no acceleration, no steering"; ``"physical"``: actions in the dynamics' own units and bounds.
        action_bounds: ``"raise"`` (default: an out-of-bounds action is an ``InvalidActionError``) or
            ``"clip"`` (clipped to the bounds, and the step's ``infeasible`` metric is set).
        obs, reward: observation sizes and options (``ObsConfig``) and reward weights (``RewardConfig``); a dict
            of their fields works too (``obs={"flat": True, "normalize": True}``).
        terminate_on_collision / terminate_on_offroad: end the episode when the ego collides / leaves the road
            (the sim-agents env never terminates early).
        controlled: who the sim-agents env controls: ``"all"`` (default: every agent valid at the start step),
            ``"vehicles"`` (every vehicle valid then), or a tuple of agent ids (for a fixed scene; ids missing
            from a scene are ignored). The ego env always controls the ego alone.
        traffic: what drives the agents the env does not control: ``"log"`` (log replay), a registered agent
            name (``"idm"``), a policy object (``envs.policy.Policy``: ``act(state, mask) -> Action`` and a
            ``dynamics`` attribute), or a list of ``(policy, selector)`` rules (``envs/traffic.py``).
        max_agents: pad scenes to this many agents (default: the largest scene of the split).
        device: torch device of the simulator state.
    """

    dataset: str = "towns"
    split: str = "train"
    data_dir: str | None = None
    cache_dir: str | None = None
    case_length: int | None = None
    scenes: tuple[str, ...] | None = None
    start_step: int = 10
    dynamics: str = "bicycle"
    action_scale: str | None = None
    action_bounds: str = "raise"
    obs: ObsConfig = field(default_factory=ObsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    terminate_on_collision: bool = True
    terminate_on_offroad: bool = True
    controlled: str | tuple[str, ...] = "all"
    traffic: Any = "log"
    max_agents: int | None = None
    device: str = "cpu"

    def __post_init__(self):
        from envs.dynamics import DYNAMICS

        if self.action_scale is None:
            object.__setattr__(self, "action_scale", "physical" if self.dynamics == "pose" else "normalized")
        if self.action_scale not in ACTION_SCALES:
            raise UnknownNameError("action_scale", self.action_scale, ACTION_SCALES)
        if self.action_scale == "normalized" and self.dynamics == "pose":
            raise ValueError("action_scale='normalized' does not apply to 'pose' dynamics (world coordinates); "
                             "use action_scale='physical'.")
        if self.action_bounds not in ACTION_BOUNDS_MODES:
            raise UnknownNameError("action_bounds mode", self.action_bounds, ACTION_BOUNDS_MODES)
        if isinstance(self.dynamics, str) and self.dynamics not in DYNAMICS:
            raise UnknownNameError("dynamics model", self.dynamics, DYNAMICS)
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}.")
        if isinstance(self.controlled, str) and self.controlled not in CONTROLLED_MODES:
            raise UnknownNameError("controlled mode", self.controlled, CONTROLLED_MODES,
                                   fix="Or pass a tuple of agent ids.")
        if self.scenes is not None and isinstance(self.scenes, str):
            raise ValueError(f"scenes must be a sequence of scene ids, got the string {self.scenes!r}.")

    @classmethod
    def from_kwargs(cls, config: EnvConfig | None = None, **overrides) -> EnvConfig:
        """``config`` (or the defaults) with ``overrides`` applied; unknown keys raise with a suggestion."""
        check_kwargs("env keyword argument", overrides, [f.name for f in fields(cls)])
        for key, kind in (("obs", ObsConfig), ("reward", RewardConfig)):
            if isinstance(overrides.get(key), dict):
                check_kwargs(f"{kind.__name__} field", overrides[key], [f.name for f in fields(kind)])
                overrides[key] = kind(**overrides[key])
        for key in ("scenes", "controlled"):
            value = overrides.get(key)
            if value is not None and not isinstance(value, str):
                overrides[key] = tuple(value)
        return replace(config or cls(), **overrides)
