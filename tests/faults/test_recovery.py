"""Recovery rules that take a configured time: stalled jobs, retries, visibility timeouts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from config.redis_acl import WORKER
from jobs.states import JobState
from lab import control
from tests.faults.conftest import assert_invariants, finish, start_throttled
from tests.support.forgery import role_redis
from tests.support.lab_fixtures import Lab, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("dirty_home", "workers_back")]

# A guest that moves in seconds, and a peer_timeout that lets keepalive give up on a frozen
# libvirtd within a few (its interval and count are set when a connection opens).
QUICK_GUEST = "idle-1"
PEER_TIMEOUT_S = 3

FAST_WATCHDOG = """[tunables]
stall_after = 4
heartbeat_ttl = 3
heartbeat_interval = 1
watchdog_interval = 1
"""


def test_a_job_whose_worker_stays_away_is_marked_stalled_then_recovered(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    fault_config(FAST_WATCHDOG)
    job_id = start_throttled(lab)
    control.kill_worker("lab1")

    def stalled() -> bool:
        return lab.drover.job(job_id).state is JobState.STALLED

    try:
        wait_for(stalled, 60, "lab2's watchdog to mark the job stalled")
    except AssertionError:
        log = Path(lab.config).parent / "hosts" / "lab2" / "worker.log"
        tail = log.read_text().splitlines()[-15:]
        raise AssertionError(f"not stalled: {lab.drover.job(job_id).state}; lab2: {tail}") from None
    job = lab.drover.job(job_id)
    assert job.reason is not None and job.reason.startswith("lab1's worker has not been seen")
    listed = {j.id: j.state.value for j in lab.drover.jobs()}
    assert listed[job_id] == "stalled"

    control.restart_worker("lab1")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "succeeded", job.reason
    states = [t.state.value for t in job.transitions]
    assert states[-4:] == ["stalled", "migrating", "finishing", "succeeded"], str(states)


def test_a_phase_that_cannot_reach_libvirtd_is_retried(lab: Lab) -> None:
    control.stop_libvirtd("lab2")
    try:
        job_id = lab.drover.submit(
            domain="dirty-1", src="lab1", dst="lab2", live=True, auto_converge=True
        )

        def retrying() -> bool:
            return any(e["event"] == "phase.retrying" for e in lab.drover.events(job_id))

        wait_for(retrying, 30, "destination_prepare to retry")
    finally:
        control.start_libvirtd("lab2")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "succeeded", job.reason


def test_a_source_libvirtd_frozen_when_prepare_asks_it_is_waited_out(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    """Probe: the destination's worker keeps its connection to the source's libvirtd from an
    earlier job (worker/peer_connections.py); that libvirtd frozen for a few seconds when
    prepare asked it failed the job "unexpectedly" (the keepalive timeout on a kept
    connection was not taken for an unreachable peer), where a fresh connection had waited
    it out. Prepare is retried now, and the guest moves once its source answers again."""
    fault_config(f"[tunables]\npeer_timeout = {PEER_TIMEOUT_S}\n")  # read at every open
    [a] = lab.running_on(QUICK_GUEST)
    b = "lab2" if a == "lab1" else "lab1"
    for src, dst in ((a, b), (b, a)):  # b's worker keeps one to a's libvirtd, and a's to b's
        job = finish(lab, lab.drover.submit(domain=QUICK_GUEST, src=src, dst=dst, live=True))
        assert job.state.value == "succeeded", job.reason
    control.freeze_worker(b)  # prepare waits in b's queue until a's libvirtd is frozen
    try:
        job_id = lab.drover.submit(domain=QUICK_GUEST, src=a, dst=b, live=True)

        def preflight_ended() -> bool:
            record = lab.drover.job(job_id).phases.get("source_preflight")
            return record is not None and record.ended is not None

        wait_for(preflight_ended, 30, "the source's preflight")
        control.freeze_libvirtd(a)
        control.thaw_worker(b)

        def retrying() -> bool:
            return any(e["event"] == "phase.retrying" for e in lab.drover.events(job_id))

        wait_for(retrying, 30, "destination_prepare to retry")
    finally:
        control.thaw_libvirtd(a)
        control.thaw_worker(b)
    job = finish(lab, job_id)
    assert_invariants(lab, job, QUICK_GUEST)
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on(QUICK_GUEST) == [b]
    lab.home(QUICK_GUEST, a)  # where the other cases expect it


def test_a_migration_outlasting_the_visibility_timeout_runs_once(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    visibility = 3
    fault_config(f"[tunables]\nbroker_visibility_timeout = {visibility}\n")
    for name in ("lab1", "lab2"):  # Celery reads its transport options at start
        control.kill_worker(name)
        control.restart_worker(name)
    job_id = start_throttled(lab)
    job = finish(lab, job_id)
    assert job.state.value == "succeeded", job.reason
    perform = job.phases["perform"]
    assert perform.ended is not None
    assert (perform.ended - perform.started).total_seconds() > visibility

    # kombu applies acks from the worker's event loop, a moment after the task starts.
    # kombu's ack emulation is the workers' (the producer's Redis user may not read it).
    unacked = role_redis(WORKER)

    def acked() -> bool:
        return job_id not in str(unacked.hgetall("unacked"))

    wait_for(acked, visibility, "the job's messages to be acknowledged")
    # Watch for three more visibility timeouts: a phase delivered again (kombu restores a
    # message whose ack it has not applied yet) must be refused by its claim, never run.
    deadline = time.monotonic() + 3 * visibility
    while time.monotonic() < deadline:
        names = [e["event"] for e in lab.drover.events(job_id)]
        # Nothing of this job waits in kombu's unacked set for redelivery.
        assert job_id not in str(unacked.hgetall("unacked"))
        time.sleep(0.2)
    assert names.count("migration.started") == 1
    assert sum(1 for n in names if n == "phase.started") == 5
    assert_invariants(lab, job)
    fault_config("")
    for name in ("lab1", "lab2"):
        control.kill_worker(name)
        control.restart_worker(name)
