"""A source worker frozen mid-migration past libvirtd's keepalive (fault probe, lab 18).

libvirtd closes the frozen worker's connection ("connection closed due to keepalive
timeout") and goes on with the peer-to-peer migration it runs by itself. Thawed, the worker
finds its migration call returned with that error. The job used to say failed, and ask lab2
for a rollback, of a guest libvirt was landing on lab2 (or had landed), and an abort sent
meanwhile was dropped. Now perform follows the migration libvirt carries on, or sees that it
landed (`migration.carried_on`), and the job ends as libvirt shows it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def start_crawling(lab: Lab) -> str:
    job_id = lab.drover.submit(domain=DOMAIN, src="lab1", dst="lab2", live=True, **CRAWLING)
    wait_for(in_transfer(lab, job_id), FAULT_WINDOW_S, "the migration to be in flight")
    return job_id


@contextlib.contextmanager
def frozen_past_keepalive(lab: Lab) -> Iterator[None]:
    """lab1's worker frozen until lab1's libvirtd has closed its connection (keepalive),
    the guest still leaving lab1; thawed when the block ends."""
    closed_before = keepalive_closures(lab, "lab1")
    control.freeze_worker("lab1")
    try:
        wait_for(
            lambda: keepalive_closures(lab, "lab1") > closed_before,
            KEEPALIVE_SEEN_S,
            "lab1's libvirtd to give its frozen worker up",
        )
        assert lab.view("lab1", DOMAIN).active  # libvirt goes on without the worker
        yield
    finally:
        control.thaw_worker("lab1")


def events_of(lab: Lab, job_id: str) -> list[str]:
    return [e["event"] for e in lab.drover.events(job_id)]


def landed_on_lab2(lab: Lab, job_id: str) -> None:
    """The job succeeded, never said failed, rolled nothing back; libvirt shows the guest
    running on lab2 only."""
    job = finish(lab, job_id, JOB_TIMEOUT_S)
    assert job.state.value == "succeeded", job.reason
    assert_invariants(lab, job, DOMAIN)
    assert lab.running_on(DOMAIN) == ["lab2"]
    assert not lab.view("lab1", DOMAIN).active
    assert "failed" not in [t.state.value for t in job.transitions], job.transitions
    assert not [e for e in events_of(lab, job_id) if e.startswith("rollback.")]
    assert "migration.carried_on" in events_of(lab, job_id)


def test_a_migration_still_running_when_the_worker_thaws_is_followed(lab: Lab) -> None:
    job_id = start_crawling(lab)
    with frozen_past_keepalive(lab):
        pass
    wait_for(
        lambda: "migration.carried_on" in events_of(lab, job_id),
        FAULT_WINDOW_S,
        "the thawed worker to follow the migration libvirt carried on",
    )
    wait_for(lambda: speed_up(lab), FAULT_WINDOW_S, "the cap to be lifted")
    landed_on_lab2(lab, job_id)


def test_a_migration_that_landed_while_the_worker_was_frozen_succeeds(lab: Lab) -> None:
    """No migration left to follow when the worker thaws: libvirt on both hosts says it
    landed (fault probe: the job said failed, 'dirty-1 is no longer active on lab1')."""
    job_id = start_crawling(lab)
    with frozen_past_keepalive(lab):
        wait_for(lambda: speed_up(lab), FAULT_WINDOW_S, "the cap to be lifted")
        wait_for(
            lambda: lab.running_on(DOMAIN) == ["lab2"],
            JOB_TIMEOUT_S,
            "libvirt to land the guest on lab2 without its worker",
        )
    landed_on_lab2(lab, job_id)


def test_an_abort_sent_while_the_worker_was_frozen_is_carried_out(lab: Lab) -> None:
    """The operator's abort meets a connection libvirtd closed: it used to be taken for
    libvirt's refusal and withdrawn, and the migration landed the guest on lab2 under an
    accepted abort (fault probe). It is carried out once the worker follows again."""
    job_id = start_crawling(lab)
    with frozen_past_keepalive(lab):
        lab.drover.abort(job_id)
    job = finish(lab, job_id, JOB_TIMEOUT_S)
    assert job.state.value == "cancelled", job.reason
    assert_invariants(lab, job, DOMAIN)
    assert lab.running_on(DOMAIN) == ["lab1"]
    assert "migration.abort_refused" not in events_of(lab, job_id)
