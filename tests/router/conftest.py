"""Fixtures of the router tests: the full expert set and in-process shard servers."""

from __future__ import annotations

import pytest

from tests.router.helpers import ShardServers, random_weights
from workers.experts import ExpertWeights


@pytest.fixture(scope="module")
def full() -> ExpertWeights:
    return random_weights()


@pytest.fixture(scope="module")
def servers(full: ExpertWeights):
    servers = ShardServers(full)
    yield servers
    servers.close()
