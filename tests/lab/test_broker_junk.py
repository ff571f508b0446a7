"""One junk entry in kombu's `unacked` hash, written with a worker's own Redis account, against
a worker restart on the real lab: kombu's restore at start loaded it as JSON and the worker
exited (`Unrecoverable error: JSONDecodeError`), so a restart or deploy took every host down
until someone deleted the key by hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from config.redis_acl import WORKER
from lab import control
from lab.layout import LabLayout
from lab.proc import alive
from tests.support.lab_fixtures import Lab, wait_for

pytestmark = pytest.mark.lab

GUEST = "idle-3"
RESTARTED = "lab2"
REMOVED_S = 60.0


@pytest.fixture
def worker_redis(lab: Lab) -> Iterator[redis.Redis]:
    state = control.LabState.load(LabLayout.from_env())
    assert state is not None
    client = redis.Redis.from_url(state.url(WORKER))
    yield client
    client.hdel("unacked", "probe-junk")  # whatever happens, the next tests find no junk
    client.zrem("unacked_index", "probe-junk")
    client.close()


def logs_from(offsets: dict[str, int]) -> str:
    state = control.LabState.load(LabLayout.from_env())
    assert state is not None
    texts = []
    for host, offset in offsets.items():
        with Path(state.hosts[host].worker_log).open("rb") as log:
            log.seek(offset)
            texts.append(log.read().decode(errors="replace"))
    return "".join(texts)


def test_a_junk_unacked_entry_does_not_stop_a_restarted_worker(
    lab: Lab, worker_redis: redis.Redis
) -> None:
    lab.home(GUEST)
    state = control.LabState.load(LabLayout.from_env())
    assert state is not None
    offsets = {h: Path(state.hosts[h].worker_log).stat().st_size for h in lab.hosts()}
    control.kill_worker(RESTARTED)
    worker_redis.hset("unacked", "probe-junk", "not json at all")
    worker_redis.zadd("unacked_index", {"probe-junk": 0})
    pid = control.restart_worker(RESTARTED)
    lab.status = control.status()
    wait_for(lambda: not worker_redis.hexists("unacked", "probe-junk"), REMOVED_S, "junk removed")
    assert alive(pid)
    assert worker_redis.zscore("unacked_index", "probe-junk") is None
    job = lab.migrate(GUEST, "lab1", RESTARTED)
    assert job.state.value == "succeeded", job.reason
    back = lab.migrate(GUEST, RESTARTED, "lab1")
    assert back.state.value == "succeeded", back.reason
    assert alive(pid)
    said = [
        line
        for line in logs_from(offsets).splitlines()
        if '"message.rejected"' in line and "probe-junk" in line
    ]
    assert len(said) == 1, said  # once, by whichever worker's restore met it
    assert "Traceback" not in logs_from(offsets)
