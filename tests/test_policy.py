"""envs.policy: the Policy protocol, name resolution through string entry points, and their errors."""

from __future__ import annotations

import pytest

from envs import policy as P
from envs.errors import TrafficGymError, UnknownNameError
from envs.traffic import resolve_traffic


class Still:
    """A policy that is not an agents.base.Agent: only act and dynamics."""

    def __init__(self):
        from envs.dynamics import make_dynamics

        self.dynamics = make_dynamics("pose")
        self.name = "still"

    def act(self, state, mask):
        raise NotImplementedError


@pytest.fixture
def clean_registry():
    saved = dict(P._ENTRY_POINTS)
    yield
    P._ENTRY_POINTS.clear()
    P._ENTRY_POINTS.update(saved)


def test_names_resolve_through_the_agent_registry_entry_point():
    from agents.idm import IDM

    agent = P.make_policy("idm")
    assert isinstance(agent, IDM)
    assert isinstance(agent, P.Policy)
    with pytest.raises(UnknownNameError, match="idn"):
        P.make_policy("idn")


def test_registered_entry_points_are_imported_on_first_use(clean_registry):
    P.register_policy("still", "tests.test_policy:Still")
    (rule,) = resolve_traffic("still")
    assert isinstance(rule.policy, Still)
    assert rule.name == "still"
    P.register_policy("still_fn", Still)
    assert isinstance(P.make_policy("still_fn"), Still)
    with pytest.raises(TrafficGymError, match="already registered"):
        P.register_policy("still", "tests.test_policy:Still")
    with pytest.raises(TypeError, match="non-empty string"):
        P.register_policy("", Still)
    with pytest.raises(TypeError, match="must be 'module:attribute' or a callable"):
        P.register_policy("three", 3)


def test_bad_entry_points_and_non_policies_are_named(clean_registry):
    with pytest.raises(TrafficGymError, match="must read 'package.module:attribute'"):
        P.load_entry_point("tests.test_policy.Still")
    with pytest.raises(TrafficGymError, match="cannot import 'no_such_module'"):
        P.load_entry_point("no_such_module:Thing")
    with pytest.raises(TrafficGymError, match="has no attribute 'Nope'"):
        P.load_entry_point("tests.test_policy:Nope")
    P.register_policy("not_a_policy", lambda: object())
    with pytest.raises(TypeError, match="no act\\(state, mask\\) and dynamics"):
        P.make_policy("not_a_policy")
    with pytest.raises(TypeError, match="A traffic policy must be"):
        resolve_traffic(object())
