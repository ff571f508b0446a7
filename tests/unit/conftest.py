"""Unit-level fixtures: a registry of hosts that do not exist, on the real test Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from jobs.store import JobStore
from tests.conftest import RedisServer
from tests.support.registry import REGISTRY, with_state_dirs


@pytest.fixture
def config(tmp_path: Path, redis_srv: RedisServer) -> Path:
    """drover.toml naming kvm1 and kvm2 (never reachable), on an emptied Redis."""
    redis.Redis.from_url(redis_srv.url).flushdb()
    path = tmp_path / "drover.toml"
    path.write_text(with_state_dirs(REGISTRY.format(url=redis_srv.url), tmp_path / "state"))
    return path


@pytest.fixture
def store(redis_srv: RedisServer) -> JobStore:
    """The job store on an emptied test Redis."""
    s = JobStore.from_url(redis_srv.url)
    s.r.flushdb()
    return s
