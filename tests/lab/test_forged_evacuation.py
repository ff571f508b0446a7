"""An evacuation record written by hand with the Redis password alone, no signed request at
all, in state `planning` (as `redis-cli HSET` would): lab1's keeper used to plan it, sign a
child with the worker's own key and move the guest. Now the guest stays where it is and the
evacuation ends `failed` with `security.rejected`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from jobs.evacuation import ACTIVE_EVACUATIONS, EVACUATION_KIND, EvacuationSpec
from jobs.keys import JOBS_INDEX, job_key
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab

pytestmark = pytest.mark.lab

GUEST = "idle-1"
FORGED_ID = "f0f0f0f0f001"


@pytest.fixture
def guest_home(lab: Lab) -> Iterator[None]:
    lab.home(GUEST)
    yield
    lab.home(GUEST)


def test_an_unsigned_planning_evacuation_moves_no_guest(lab: Lab, guest_home: None) -> None:
    r = lab.drover.store.r
    r.delete(job_key(FORGED_ID))  # a previous run's
    ts = datetime.now(UTC)
    spec = EvacuationSpec(host="lab1", to=["lab2"])
    r.hset(
        job_key(FORGED_ID),
        mapping={
            "id": FORGED_ID,
            "kind": EVACUATION_KIND,
            "state": "planning",
            "spec": spec.model_dump_json(),
            "origin": "producer@forger",
            "created": ts.isoformat(),
            "updated": ts.isoformat(),
        },
    )
    r.zadd(JOBS_INDEX, {FORGED_ID: ts.timestamp()})
    r.sadd(ACTIVE_EVACUATIONS, FORGED_ID)

    ev = lab.drover.wait_evacuation(FORGED_ID, JOB_TIMEOUT_S)

    assert ev.state.value == "failed", ev
    assert ev.reason is not None and ev.reason.startswith("security: "), ev.reason
    assert ev.children == {}
    assert "security.rejected" in [e["event"] for e in lab.drover.events(FORGED_ID)]
    assert lab.running_on(GUEST) == ["lab1"]
    assert not lab.view("lab2", GUEST).exists
