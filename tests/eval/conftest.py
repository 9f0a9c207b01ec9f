"""Fixtures of the evaluation tests: the deterministic fake judge on loopback (tests/eval/fake_judge_server.py)."""

from __future__ import annotations

import pytest
from fake_judge_server import FakeJudge


@pytest.fixture
def fake():
    """start(mode="ok", **kw) -> a running FakeJudge; every judge started is stopped after the test."""
    servers = []

    def start(mode: str = "ok", **kw) -> FakeJudge:
        servers.append(FakeJudge(mode, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()
