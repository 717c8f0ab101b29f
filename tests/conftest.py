"""Test-wide settings: every test session gets its own trafficgym home (data + caches), so tests never read
or write the user's ~/.cache/trafficgym and a fresh clone exercises the full first-use path."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


@pytest.fixture(scope="session", autouse=True)
def _isolated_trafficgym_home(tmp_path_factory):
    old = os.environ.get("TRAFFICGYM_HOME")
    os.environ["TRAFFICGYM_HOME"] = str(tmp_path_factory.mktemp("trafficgym_home"))
    yield
    if old is None:
        os.environ.pop("TRAFFICGYM_HOME", None)
    else:
        os.environ["TRAFFICGYM_HOME"] = old


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """The hand-built INTERACTION-layout dataset (tests/interaction_fixture.py): 3 cases of 91 frames."""
    from tests import interaction_fixture

    return interaction_fixture.write_dataset(tmp_path_factory.mktemp("tiny_dataset"), cases=3, case_length=91)


@pytest.fixture(scope="session")
def tiny_env_kwargs(tiny_root, tmp_path_factory):
    """Keyword arguments that point an env at the tiny dataset's val split."""
    return dict(dataset="interaction_multi", data_dir=str(tiny_root), case_length=91, split="val",
                cache_dir=str(tmp_path_factory.mktemp("tiny_cache")))
