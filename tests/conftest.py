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
