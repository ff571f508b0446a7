"""A source worker frozen mid-migration past libvirtd's keepalive (fault probe, lab 18).

libvirtd closes the frozen worker's connection ("connection closed due to keepalive
timeout") and goes on with the peer-to-peer migration it runs by itself. Thawed, the worker
finds its migration call returned with that error. The job used to say failed, and ask lab2
for a rollback, of a guest libvirt was landing on lab2. Now perform follows the migration
libvirt carries on (`migration.carried_on`) and the job ends as libvirt shows it: succeeded,
the guest running on lab2 only.
"""

from __future__ import annotations

import libvirt
import pytest

from lab import control
from tests.faults.conftest import FAULT_WINDOW_S, assert_invariants, finish, in_transfer
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("dirty_home", "workers_back")]

DOMAIN = "dirty-1"
# Slow enough that the migration is still on the wire when libvirtd gives the worker up
# (its keepalive: 5 s x 5), under the `manual` policy so nothing but the test ends it.
CRAWLING = {"policy": "manual", "bandwidth_mib": 2, "auto_converge": True}
KEEPALIVE_SEEN_S = 90.0
KEEPALIVE_WORDS = "connection closed due to keepalive timeout"
# Once the worker is back, the rest goes at this speed (MiB/s) so the case ends soon.
CATCH_UP_MIB = 256


def keepalive_closures(lab: Lab, host: str) -> int:
    """How many client connections `host`'s libvirtd has closed for their keepalive."""
    log = lab.log_dir(host) / "libvirtd.log"
    return log.read_text(errors="replace").count(KEEPALIVE_WORDS) if log.exists() else 0


def speed_up(lab: Lab) -> bool:
    """Lift the migration's bandwidth cap on lab1; True once libvirt took it, or once the
    guest no longer runs there."""
    conn = libvirt.open(lab.uri("lab1"))
    try:
        dom = conn.lookupByName(DOMAIN)
        if not dom.isActive():
            return True
        dom.migrateSetMaxSpeed(CATCH_UP_MIB)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def test_a_source_worker_frozen_past_the_keepalive_ends_as_libvirt_shows(lab: Lab) -> None:
    job_id = lab.drover.submit(domain=DOMAIN, src="lab1", dst="lab2", live=True, **CRAWLING)
    wait_for(in_transfer(lab, job_id), FAULT_WINDOW_S, "the migration to be in flight")
    closed_before = keepalive_closures(lab, "lab1")
    control.freeze_worker("lab1")
    try:
        wait_for(
            lambda: keepalive_closures(lab, "lab1") > closed_before,
            KEEPALIVE_SEEN_S,
            "lab1's libvirtd to give its frozen worker up",
        )
        # libvirt goes on without the worker: the guest still leaving lab1.
        assert lab.view("lab1", DOMAIN).active
    finally:
        control.thaw_worker("lab1")
    wait_for(
        lambda: "migration.carried_on" in [e["event"] for e in lab.drover.events(job_id)],
        FAULT_WINDOW_S,
        "the thawed worker to follow the migration libvirt carried on",
    )
    wait_for(lambda: speed_up(lab), FAULT_WINDOW_S, "the cap to be lifted")
    job = finish(lab, job_id, JOB_TIMEOUT_S)
    assert job.state.value == "succeeded", job.reason
    assert_invariants(lab, job, DOMAIN)
    assert lab.running_on(DOMAIN) == ["lab2"]
    assert not lab.view("lab1", DOMAIN).active
    assert "failed" not in [t.state.value for t in job.transitions], job.transitions
    events = [e["event"] for e in lab.drover.events(job_id)]
    assert not [e for e in events if e.startswith("rollback.")], events
