"""The suite's own rules: its markers are registered, and the fast subset (`-m "not slow"`) reaches every test file."""

import pytest
from conftest import COLLECTED


def test_the_markers_are_registered_and_enforced(pytestconfig: pytest.Config):
    registered = {line.split(":", 1)[0] for line in pytestconfig.getini("markers")}
    assert {"slow", "cuda"} <= registered
    assert pytestconfig.getini("strict_markers"), "an unregistered marker must be an error"


def test_every_test_file_keeps_a_fast_test(pytestconfig: pytest.Config):
    """Checked over the files collected with this one: the whole suite in CI and in the fast subset."""
    collected = pytestconfig.stash[COLLECTED]
    files = {item.path.name for item in collected}
    fast = {item.path.name for item in collected if item.get_closest_marker("slow") is None}
    assert files - fast == set(), "test files whose every test is marked slow"
