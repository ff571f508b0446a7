"""No job lies and no job harms another (issue 11): each case checked through libvirt on every
host, by the job's final state and result, its events, and what the CLI says.

- the source definition removed mid-flight: the guest runs on the destination, so the job
  succeeds, with the leftovers in its result, and nothing is rolled back;
- a second job for a domain whose leases ran out: its prepare is refused by the destination's
  ledger, and its rollback leaves the first job's incoming guest alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from config.redis_acl import WORKER
from jobs.store import domain_lock_key
from tests.faults.conftest import assert_invariants, check, finish, start_throttled
from tests.support.forgery import role_redis
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for

pytestmark = pytest.mark.usefixtures("dirty_home", "workers_back")

# Slow enough that a second job reaches its prepare while the first is still copying memory
# (dirty-1 never converges at this cap; its completion timeout suspends it and ends it).
CRAWL_MIB = 8


def events_of(lab: Lab, job_id: str) -> list[dict[str, Any]]:
    return list(lab.drover.events(job_id))


def named(lab: Lab, job_id: str, name: str) -> list[dict[str, Any]]:
    return [e for e in events_of(lab, job_id) if e["event"] == name]


def domain_id(lab: Lab, host: str, name: str) -> int | None:
    """libvirt's id of the running domain on `host` (a destroyed and restarted guest gets a
    new one), or None when it is not running there."""
    conn = libvirt.open(lab.uri(host))
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return None
        return int(dom.ID()) if dom.isActive() else None
    finally:
        conn.close()


@pytest.fixture
def source_definition(lab: Lab) -> Iterator[str]:
    """dirty-1's persistent definition on lab1, put back after a case removes it."""
    conn = libvirt.open(lab.uri("lab1"))
    try:
        xml = conn.lookupByName("dirty-1").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        conn.close()
    yield xml
    conn = libvirt.open(lab.uri("lab1"))
    try:
        conn.defineXML(xml)
    finally:
        conn.close()


def test_source_undefined_mid_flight_still_succeeds(lab: Lab, source_definition: str) -> None:
    job_id = start_throttled(lab)
    conn = libvirt.open(lab.uri("lab1"))
    try:
        conn.lookupByName("dirty-1").undefine()  # as `virsh undefine dirty-1` on the source
    finally:
        conn.close()
    job = finish(lab, job_id)
    check(job.state.value == "succeeded", f"job {job.state.value}: {job.reason}")
    check(lab.running_on("dirty-1") == ["lab2"], f"dirty-1 runs on {lab.running_on('dirty-1')}")
    check(not lab.view("lab1", "dirty-1").exists, "lab1 has a definition nobody made")
    leftovers = str(job.result.get("leftovers", ""))
    check("no longer defined" in leftovers, f"result {job.result}")
    reported = named(lab, job_id, "confirm.leftovers")
    check(len(reported) == 1 and "no longer defined" in str(reported[0]["reason"]), f"{reported}")
    rollbacks = [e for e in events_of(lab, job_id) if e.get("phase") == "rollback"]
    check(not rollbacks, f"a rollback was sent to lab2, where the guest runs: {rollbacks}")
    # The definition is put back where it was (what the job left it as, had nobody undefined
    # it), and then everything else holds as after any successful job.
    conn = libvirt.open(lab.uri("lab1"))
    try:
        conn.defineXML(source_definition)
    finally:
        conn.close()
    assert_invariants(lab, job)


def test_a_second_job_never_destroys_the_first_jobs_incoming_guest(lab: Lab) -> None:
    first_id = start_throttled(lab, bandwidth_mib=CRAWL_MIB)
    incoming = domain_id(lab, "lab2", "dirty-1")
    check(incoming is not None, "no incoming dirty-1 on lab2 while migrating")
    uuid = lab.drover.job(first_id).facts["uuid"]
    # The first job's leases run out under its live migration (as a keeper that stopped
    # renewing them would let happen): nothing in Redis says dirty-1 is busy any more.
    role_redis(WORKER).delete(domain_lock_key("name", "dirty-1"), domain_lock_key("uuid", uuid))
    second_id = lab.drover.submit(domain="dirty-1", src="lab1", dst="lab2", live=True)
    second = finish(lab, second_id)
    check(second.state.value == "failed", f"second job {second.state.value}: {second.reason}")
    check(
        second.reason is not None and f"for job {first_id}" in second.reason,
        f"second job failed for another reason: {second.reason}",
    )
    wait_for(lambda: bool(named(lab, second_id, "rollback.done")), JOB_TIMEOUT_S, "its rollback")
    check(not named(lab, second_id, "rollback.removed_incoming"), "it destroyed a guest")
    check(lab.drover.job(first_id).state.value == "migrating", "the first job was disturbed")
    check(domain_id(lab, "lab2", "dirty-1") == incoming, "the incoming guest was replaced")
    first = finish(lab, first_id)
    assert_invariants(lab, first)
    check(first.state.value == "succeeded", f"first job {first.state.value}: {first.reason}")
    check(domain_id(lab, "lab2", "dirty-1") == incoming, "the guest was destroyed on lab2")
