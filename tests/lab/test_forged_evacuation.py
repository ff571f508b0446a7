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
from tests.lab.test_evacuate_children_lost import home
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, dirty_running, wait_for

pytestmark = pytest.mark.lab

__all__ = ["dirty_running", "home"]  # fixtures, used by name
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


FORGED_CHILD = "fa0000000001"


def drain_lab1(lab: Lab) -> str:
    """lab1's evacuation, all at once: the idle guests are moved in seconds, while dirty-1 at
    8 MiB/s takes longer (suspended after 3 s, then copied): its child is the last one live."""
    spec = lab.drover.evacuation_spec(
        host="lab1", to=["lab2", "lab3"], max_parallel=5, bandwidth_mib=8, completion_timeout_s=3
    )
    return lab.drover.evacuate(spec)


def test_a_forged_succeeded_child_does_not_end_the_evacuation_under_its_real_one(
    lab: Lab,
    dirty_running: None,
    home: None,  # its teardown first: it enables lab1 again
) -> None:
    """While dirty-1's child migrates, a copy of its record written `succeeded` with no
    signed request, and the evacuation's list pointed at it (the attacker probe): the
    evacuation ended `partial` at once, dirty-1 mid-migration. Now the watch finds the real
    child by its lease, says the forged one once, and the evacuation drains."""
    d = lab.drover
    r = d.store.r
    r.delete(job_key(FORGED_CHILD))  # a previous run's
    ev_id = drain_lab1(lab)
    seen: list[str] = []

    def dirty_child_migrating() -> bool:
        child = d.evacuation(ev_id).children.get("dirty-1")
        if child is not None and d.job(child).state.value == "migrating":
            seen.append(child)
        return bool(seen)

    wait_for(dirty_child_migrating, JOB_TIMEOUT_S, "dirty-1's child migrating")
    real = seen[0]
    record = {k: v for k, v in r.hgetall(job_key(real)).items() if k != "request"}
    r.hset(job_key(FORGED_CHILD), mapping={**record, "id": FORGED_CHILD, "state": "succeeded"})
    r.hset(f"{job_key(ev_id)}:children", "dirty-1", FORGED_CHILD)

    ev = d.wait_evacuation(ev_id, JOB_TIMEOUT_S)
    assert ev.state.value == "drained", ev.reason
    assert ev.children["dirty-1"] == real and d.job(real).state.value == "succeeded"
    (where,) = lab.running_on("dirty-1")
    assert where in ("lab2", "lab3") and not lab.view("lab1", "dirty-1").exists
    refused = [e for e in d.events(ev_id) if e["event"] == "security.rejected"]
    assert [e.get("child") for e in refused] == [FORGED_CHILD]


def test_an_abort_flag_written_on_a_drain_stops_none_of_it(
    lab: Lab,
    dirty_running: None,
    home: None,  # its teardown first: it enables lab1 again
) -> None:
    """`HSET drover:job:EV abort_requested "aborted by operator"` while lab1 drains: its
    worker cancelled the queued children and aborted the running ones, no operator asking.
    No trusted key signed that flag: lab1 says so once, and the drain completes."""
    d = lab.drover
    ev_id = drain_lab1(lab)
    wait_for(lambda: bool(d.evacuation(ev_id).children), JOB_TIMEOUT_S, "the drain's children")
    d.store.r.hset(job_key(ev_id), "abort_requested", "aborted by operator")

    ev = d.wait_evacuation(ev_id, JOB_TIMEOUT_S)
    assert ev.state.value == "drained", ev.reason
    refused = [e for e in d.events(ev_id) if e["event"] == "security.rejected"]
    assert len(refused) == 1 and "abort flag is not acted on" in refused[0]["reason"], refused
    for domain in ev.children:
        assert d.job(ev.children[domain]).state.value == "succeeded", domain
        assert not lab.view("lab1", domain).exists, f"{domain} still on lab1"
