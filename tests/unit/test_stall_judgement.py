"""Whether a job waits on a host whose worker is gone (`stalled`), as recovery judges it.

The fault probe: a Redis outage longer than `stall_after` during perform; once Redis was back,
lab1's keeper found lab2's heartbeat run out (every key with a time to live does, in an
outage) and marked the job `stalled` within a second, while lab2 ran the migration and beat
again within seconds. The job stayed `stalled` for as long as the migration ran, and tune,
post-copy and force-complete were refused. Now a peer counts as gone only on this process's
own consecutive looks, and the host whose phase runs puts a stalled job back.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from jobs.keys import heartbeat_key, job_key
from jobs.phases import Phase
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue
from tests.support.lab_fixtures import wait_for
from tests.unit.test_abort_stalled import stalled_in
from worker import recovery
from worker.runtime import Runtime


@pytest.fixture
def quick_stall(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config.write_text(config.read_text() + "\n[tunables]\nstall_after = 0.2\n")
    monkeypatch.setenv("DROVER_CONFIG", str(config))


def runtime(store: JobStore, host: str) -> Runtime:
    return Runtime(host=host, store=store, libvirt=cast(Any, None), ledger=cast(Any, None))


def finish_waiting_on_kvm2(store: JobStore) -> str:
    """A job whose next step is kvm2's finish, perform having ended on kvm1."""
    job_id = stalled_in(store, JobState.MIGRATING)
    store.transition(job_id, JobState.MIGRATING, host="kvm1")
    for phase, host in (("source_preflight", "kvm1"), ("destination_prepare", "kvm2")):
        store.phase_ended(job_id, phase, started=store.phase_started(job_id, phase, host))
    store.phase_ended(job_id, "perform")
    assert store.get(job_id).state is JobState.MIGRATING
    return job_id


def test_a_peer_unseen_across_a_gap_in_the_looks_is_not_judged_at_once(
    quick_stall: None, store: JobStore
) -> None:
    job_id = finish_waiting_on_kvm2(store)
    rt = runtime(store, "kvm1")
    tick = rt.settings.tunables.watchdog_interval
    # The last look was before an outage: more than two ticks ago.
    then = time.monotonic() - 3 * tick
    rt.peers_unseen["kvm2"] = (then - 60.0, then)
    recovery.sweep(rt)
    assert store.get(job_id).state is JobState.MIGRATING  # the count starts again now

    def stalled() -> bool:  # kvm2 still not seen, on consecutive looks past stall_after
        recovery.sweep(rt)
        return store.get(job_id).state is JobState.STALLED

    wait_for(stalled, 5, "the job to be marked stalled")


def test_a_peer_seen_again_starts_the_count_again(quick_stall: None, store: JobStore) -> None:
    job_id = finish_waiting_on_kvm2(store)
    rt = runtime(store, "kvm1")
    recovery.sweep(rt)
    assert "kvm2" in rt.peers_unseen
    then = time.monotonic() - 1.0  # unseen since well past stall_after
    rt.peers_unseen["kvm2"] = (then, time.monotonic())
    store.r.set(heartbeat_key("kvm2"), "w@kvm2", ex=10)  # kvm2's worker beats again
    recovery.sweep(rt)
    assert "kvm2" not in rt.peers_unseen
    store.r.delete(heartbeat_key("kvm2"))  # gone again: counted from this look on
    recovery.sweep(rt)
    assert store.get(job_id).state is JobState.MIGRATING


def test_the_host_whose_phase_runs_puts_a_stalled_job_back(
    quick_stall: None, store: JobStore
) -> None:
    job_id = stalled_in(store, JobState.MIGRATING)  # perform started on kvm1, not ended
    for phase, host in (("source_preflight", "kvm1"), ("destination_prepare", "kvm2")):
        store.phase_ended(job_id, phase, started=store.phase_started(job_id, phase, host))
    assert recovery.current_step(store.get(job_id)) == recovery.Step(
        Phase.PERFORM, True, store.get(job_id).phases["perform"].started
    )
    rt = runtime(store, "kvm1")
    assert rt.mark(job_id, "perform")  # running in this process
    recovery.sweep(rt)
    job = store.get(job_id)
    assert job.state is JobState.MIGRATING and job.reason is None, (job.state, job.reason)


def test_a_stalled_job_that_moved_on_meanwhile_is_not_said_put_back(
    quick_stall: None, store: JobStore
) -> None:
    """The sweep read the job `stalled`; before it put it back, the job's own phase moved it
    on (perform ended, finish began on kvm2). No transition, and no `job.state` event that
    would say `migrating` after `finishing` in the job's stream."""
    job_id = stalled_in(store, JobState.MIGRATING)
    for phase, host in (("source_preflight", "kvm1"), ("destination_prepare", "kvm2")):
        store.phase_ended(job_id, phase, started=store.phase_started(job_id, phase, host))
    read = store.get(job_id)  # what the sweep read: stalled, from migrating
    step = recovery.current_step(read)
    assert read.state is JobState.STALLED and step is not None
    store.phase_ended(job_id, "perform")
    assert store.transition(job_id, JobState.FINISHING, host="kvm2")[0]
    rt = runtime(store, "kvm1")
    assert rt.mark(job_id, "perform")  # (so nothing else is done for the step)
    with capture_logs() as logs:
        recovery._attend(rt, read, step)
    assert store.get(job_id).state is JobState.FINISHING
    assert [e for e in logs if e["event"] == "job.state"] == []


def test_a_job_waiting_in_line_is_never_stalled_by_its_sources_absence(
    quick_stall: None, store: JobStore
) -> None:
    """A job queued behind a limit, never admitted, whose source's worker is away: it was
    marked `stalled`, which took it out of its lane for good (admission drops a head that is
    not queued), and put back to `queued` when the worker returned, in no lane: queued for
    ever, its domain refused to any new job (fault probe, lab 18). It waits in line, as it
    should: nothing is sent to its source before admission. An admitted one, whose first
    phase waits for that worker, is stalled as before."""
    waiting = enqueue(store, MigrationSpec(domain="web01", src="kvm1", dst="kvm2"), origin="t")
    admitted = enqueue(store, MigrationSpec(domain="web02", src="kvm1", dst="kvm2"), origin="t")
    store.r.hset(job_key(admitted), "admitted", datetime.now(UTC).isoformat())
    rt = runtime(store, "kvm2")  # any worker's recovery, kvm1's worker unseen

    def stalled() -> bool:
        recovery.sweep(rt)
        return store.get(admitted).state is JobState.STALLED

    wait_for(stalled, 5, "the admitted job to be marked stalled")
    job = store.get(waiting)
    assert job.state is JobState.QUEUED and job.reason is None, (job.state, job.reason)
