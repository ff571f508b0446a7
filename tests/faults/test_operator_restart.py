"""What the operator decided about a running migration outlives a restart of its source's
worker (a probe, lab 21): the downtime set with `drover tune --max-downtime` stays libvirt's,
and a force-complete's pause is not undone by the re-attached watch's policy. Checked through
libvirt on both hosts, with the fault suite's invariants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import libvirt
import pytest

from config.settings import load_settings
from jobs.errors import ControlUnanswered
from lab import control
from producer.api import Drover
from tests.faults.conftest import FAULT_WINDOW_S, assert_invariants, finish, in_transfer
from tests.support.controls import when_free
from tests.support.forgery import log_events
from tests.support.lab_fixtures import Lab, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("dirty_home", "workers_back")]

OPERATOR_DOWNTIME_MS = 777
REPLY_TIMEOUT_S = 3  # how long a control request is good for, in the expiry case
SLOW_MIB = 8  # far below dirty-1's dirty rate: pre-copy never ends on its own
# Post-copy forbidden, no step of its own but the abort at its completion timeout; slow
# enough that, paused by force-complete, dirty-1 lands well after that timeout.
NO_POSTCOPY = """[policies.nopc]
bandwidth_mib = 4
allow_postcopy = false
completion_timeout_s = 15
act_on_statistics = false
actions = ["abort"]
"""


def events(lab: Lab, job_id: str) -> list[dict[str, Any]]:
    return list(lab.drover.events(job_id))


def after_reattach(lab: Lab, job_id: str, want: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether an event `want` picks came after the restarted worker took the migration up
    (`phase.recovering`; its watch's first look comes before `migration.reattached`)."""
    seen = events(lab, job_id)
    marks = [i for i, e in enumerate(seen) if e["event"] == "phase.recovering"]
    return bool(marks) and any(want(e) for e in seen[marks[0] :])


def max_downtime(lab: Lab) -> int:
    conn = libvirt.open(lab.uri("lab1"))
    try:
        return int(conn.lookupByName("dirty-1").migrateGetMaxDowntime(0))
    finally:
        conn.close()


def restarted_source(lab: Lab) -> None:
    control.kill_worker("lab1")
    control.restart_worker("lab1")


def test_the_operators_downtime_outlives_a_restart_of_the_source_worker(lab: Lab) -> None:
    job_id = lab.drover.submit(
        domain="dirty-1", src="lab1", dst="lab2", live=True, bandwidth_mib=8, policy="no-postcopy"
    )
    wait_for(in_transfer(lab, job_id), FAULT_WINDOW_S, "the migration to be in flight")
    # Asked again while the policy's own step holds the migration (its line says to).
    tuned = when_free(
        lambda: lab.drover.tune(job_id, max_downtime_ms=OPERATOR_DOWNTIME_MS), FAULT_WINDOW_S
    )
    assert "max_downtime_ms=777" in tuned
    restarted_source(lab)

    def held(e: dict[str, Any]) -> bool:
        return e["event"] == "policy.step" and e.get("held_by") == "operator"

    try:
        wait_for(lambda: after_reattach(lab, job_id, held), FAULT_WINDOW_S, "a held step")
        assert max_downtime(lab) == OPERATOR_DOWNTIME_MS  # not the policy's 100 ms again
    finally:
        lab.drover.abort(job_id)
    assert_invariants(lab, finish(lab, job_id))


def test_a_force_completed_migration_is_not_aborted_by_the_restarted_workers_policy(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    fault_config(NO_POSTCOPY)
    drover = Drover(load_settings(lab.config))  # a producer that knows the policy
    job_id = drover.submit(domain="dirty-1", src="lab1", dst="lab2", live=True, policy="nopc")
    wait_for(in_transfer(lab, job_id), FAULT_WINDOW_S, "the migration to be in flight")
    # Post-copy is not allowed; asked again while the policy's own step holds the job.
    assert "suspend" in when_free(lambda: drover.force_complete(job_id), FAULT_WINDOW_S)
    restarted_source(lab)
    try:
        wait_for(
            lambda: after_reattach(lab, job_id, lambda e: e["event"] == "policy.stood_down"),
            FAULT_WINDOW_S,
            "the re-attached watch to stand down",
        )
    except AssertionError:
        seen = [(e["event"], e.get("action"), e.get("stage")) for e in events(lab, job_id)]
        raise AssertionError(f"no stand-down after the re-attach: {seen}") from None
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "succeeded", job.reason  # not aborted at the 15 s timeout
    assert not [
        e for e in events(lab, job_id) if e["event"] == "policy.step" and e["action"] == "abort"
    ]


def test_a_control_taken_after_its_producer_stopped_waiting_is_dropped(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    """Probe: `drover postcopy` asked while the source's worker was dead said "no answer",
    and the restarted worker then switched the guest to post-copy from its queue (which no
    abort can undo). The request expired with the producer's wait: the restarted worker
    drops it, and the migration stays in pre-copy, abortable."""
    fault_config(f"[tunables]\ncontrol_reply_timeout = {REPLY_TIMEOUT_S}\n")
    drover = Drover(load_settings(lab.config))  # a producer that reads the short wait
    job_id = drover.submit(
        domain="dirty-1",
        src="lab1",
        dst="lab2",
        live=True,
        postcopy=True,
        policy="manual",
        bandwidth_mib=SLOW_MIB,
    )
    wait_for(in_transfer(lab, job_id), FAULT_WINDOW_S, "the migration to be in flight")
    control.kill_worker("lab1")  # libvirtd carries the migration on
    with pytest.raises(ControlUnanswered, match="may still be carried out"):
        drover.start_postcopy(job_id)
    control.restart_worker("lab1")

    def dropped() -> bool:
        return any("expired" in str(e.get("reason")) for e in log_events("lab1", job_id))

    wait_for(dropped, FAULT_WINDOW_S, "the restarted worker to drop the expired request")
    names = [e["event"] for e in events(lab, job_id)]
    assert "migration.postcopy_started" not in names, names
    assert lab.drover.job(job_id).postcopy_since is None
    said = lab.drover.abort(job_id)  # still pre-copy: abortable
    assert said.startswith("abort requested"), said
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "cancelled", job.reason
