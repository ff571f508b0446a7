"""An operator's cancel, kept by each of the job's hosts (worker/cancel_notice.py): a record
written back to a live state in Redis runs no phase, and says `cancelled` again; an abort of
a running migration, kept by its source, whatever becomes of the record's flag. Real test
Redis, real SQLite ledger; the notices' own delivery is tests/lab/test_attacks.py's and
tests/lab/test_control.py's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from config import envelope
from config.celery import _ttl_within
from config.message_checks import envelope_problem
from config.security import ABORT_NOTICE_TASK, CANCEL_NOTICE_TASK, message_life
from config.settings import Tunables
from jobs.abort import TooLate, abort_job, host_notifier
from jobs.keys import job_key
from jobs.model import Job
from jobs.phases import Phase, task_name
from jobs.states import JobState
from jobs.store import JobStore
from tests.unit.test_forged_admission import admit, rt, submit
from worker.cancel_notice import abort_asked, note_abort, note_cancel
from worker.ledger import Ledger
from worker.phase_errors import Dropped
from worker.phase_frame import execute_phase
from worker.runtime import Runtime

__all__ = ["rt"]  # a fixture, used by name


def never(_rt: Runtime, _job: Job) -> JobState | None:
    raise AssertionError("no phase of a cancelled job runs")


def cancelled(rt: Runtime, store: JobStore, job_id: str) -> None:
    """`drover abort` of the job, its notice taken by this host's worker."""
    line = abort_job(
        store,
        job_id,
        by="ops@site",
        rollback=lambda _j: None,
        notify=lambda j, _task: note_cancel(rt, j.id),
    )
    assert "cancelled" in line


@pytest.mark.parametrize("written_back", ["queued", "preflight", "prepared"])
def test_a_cancelled_job_written_back_live_runs_no_phase_and_says_cancelled_again(
    rt: Runtime, store: JobStore, written_back: str
) -> None:
    job_id = submit(store, "web01")
    assert admit(rt) == [job_id]
    cancelled(rt, store, job_id)
    assert rt.ledger.cancelled_by(job_id) is not None
    store.r.hset(job_key(job_id), "state", written_back)  # the attacker's writes
    store.r.hdel(job_key(job_id), "reason", "abort_requested")

    phase = Phase.SOURCE_PREFLIGHT  # this host's (the destination's prepare: the same)
    for look in ("first", "again"):  # admission's message, then a redispatched one
        with capture_logs() as logs, pytest.raises(Dropped):
            execute_phase(rt, job_id, phase, never)
        job = store.get(job_id)
        assert job.state is JobState.CANCELLED
        assert job.reason is not None and f"job {job_id} was cancelled by" in job.reason
        assert phase.value not in job.phases
        said = [e["event"] for e in logs]
        if look == "first":  # the first look sets the record back
            assert said[:2] == ["security.rejected", "job.state"], said
        assert said[-1] == "phase.skipped", said


def test_the_cancel_outlives_the_worker_and_a_record_removed(
    rt: Runtime, store: JobStore, tmp_path: Path
) -> None:
    job_id = submit(store, "web02")
    cancelled(rt, store, job_id)
    store.r.delete(job_key(job_id))
    note_cancel(rt, job_id)  # a notice whose record is gone is kept all the same
    restarted = Ledger(str(tmp_path / "ledger"))
    assert restarted.cancelled_by(job_id) is not None
    assert restarted.cancelled_by("0123456789ab") is None


def test_a_notice_lives_as_long_as_a_request_and_no_other_message_does() -> None:
    """A worker away for longer than a message's life still hears of the cancel when it is
    back: the notice's envelope may run to `request_max_age`; a phase's may not."""
    tunables = Tunables()
    assert message_life(CANCEL_NOTICE_TASK, tunables) == tunables.request_max_age
    assert message_life(ABORT_NOTICE_TASK, tunables) == tunables.request_max_age
    preflight = task_name(Phase.SOURCE_PREFLIGHT)
    assert message_life(preflight, tunables) == tunables.message_ttl
    assert _ttl_within(time.time(), None, CANCEL_NOTICE_TASK) == tunables.request_max_age
    assert _ttl_within(time.time(), None, preflight) == tunables.message_ttl

    now = time.time()
    day = tunables.request_max_age - 60
    notice = envelope.stamp(CANCEL_NOTICE_TASK, "kvm1", "0123456789ab", now, day)
    assert envelope_problem(CANCEL_NOTICE_TASK, "kvm1", "0123456789ab", notice) is None
    phase = envelope.stamp(preflight, "kvm1", "0123456789ab", now, day)
    said = envelope_problem(preflight, "kvm1", "0123456789ab", phase)
    assert said is not None and "further away" in said


def test_an_abort_of_a_running_migration_is_kept_by_its_source_when_its_flag_is_deleted(
    rt: Runtime, store: JobStore, tmp_path: Path
) -> None:
    """Probe, with the producer's password: the abort flag deleted as soon as it was set, and
    the migration went on after the operator was told it would be aborted. The source keeps
    the abort from its notice; the monitor's look (`abort_asked`) finds it there."""
    job_id = submit(store, "web03")
    assert admit(rt) == [job_id]
    store.r.hset(job_key(job_id), "state", JobState.MIGRATING.value)
    told: list[str] = []

    def notify(job: Job, task: str) -> None:
        told.append(task)
        note_abort(rt, job.id)

    line = abort_job(store, job_id, by="ops@site", rollback=lambda _j: None, notify=notify)
    assert line.startswith("abort requested: kvm1 aborts"), line
    assert told == [ABORT_NOTICE_TASK]
    assert abort_asked(rt, job_id) == "aborted by operator"
    store.r.hdel(job_key(job_id), "abort_requested")  # the attacker's write
    assert store.abort_requested(job_id) is None
    assert abort_asked(rt, job_id) == "aborted by operator"
    assert Ledger(str(tmp_path / "ledger")).abort_asked(job_id) == "aborted by operator"
    assert abort_asked(rt, submit(store, "web04")) is None  # another job: not asked


def test_an_abort_that_cannot_reach_the_source_says_so_and_stands(
    rt: Runtime, store: JobStore
) -> None:
    job_id = submit(store, "web05")
    assert admit(rt) == [job_id]
    store.r.hset(job_key(job_id), "state", JobState.MIGRATING.value)

    def broker_away(_job: Job, _task: str) -> None:
        raise ConnectionError("broker unreachable")

    line = abort_job(store, job_id, by="ops@site", rollback=lambda _j: None, notify=broker_away)
    assert "kvm1 could not be told (broker unreachable)" in line
    assert "aborts on the record's signed flag alone" in line
    assert store.abort_requested(job_id) == "aborted by operator"


def test_a_cancel_is_told_to_both_hosts_an_abort_to_the_source_only(store: JobStore) -> None:
    from config.celery import app, host_queue

    job = store.get(submit(store, "web06"))
    sent: list[tuple[str, str]] = []
    notify = host_notifier(app, lambda sig: sent.append((sig.task, sig.options["queue"])))
    notify(job, CANCEL_NOTICE_TASK)
    notify(job, ABORT_NOTICE_TASK)
    src, dst = host_queue(job.spec.src), host_queue(job.spec.dst)
    assert sent == [(CANCEL_NOTICE_TASK, src), (CANCEL_NOTICE_TASK, dst), (ABORT_NOTICE_TASK, src)]


@pytest.mark.parametrize(
    "written",
    [
        {"state": "succeeded"},
        {"state": "finishing"},
        {"postcopy_since": "2026-12-05T07:00:00+00:00"},
    ],
    ids=["succeeded", "finishing", "postcopy"],
)
def test_an_abort_the_record_calls_too_late_is_told_to_the_source_all_the_same(
    rt: Runtime, store: JobStore, written: dict[str, str]
) -> None:
    """Probe, with the producer's password: a migrating job written `succeeded`, `finishing`
    or in post-copy could not be aborted (the operator was told so) while libvirt went on
    moving the guest. The refusal stands on the record's word, said as such, and the source
    is sent the abort notice: its worker aborts a migration libvirt still runs in pre-copy."""
    job_id = submit(store, f"web-{next(iter(written.values()))[:4]}")
    assert admit(rt) == [job_id]
    store.r.hset(job_key(job_id), mapping={"state": JobState.MIGRATING.value, **written})
    told: list[str] = []

    def notify(job: Job, task: str) -> None:
        told.append(task)
        note_abort(rt, job.id)

    with pytest.raises(TooLate) as refused:
        abort_job(store, job_id, by="ops@site", rollback=lambda _j: None, notify=notify)
    assert "the job record's word: kvm1 was told all the same" in str(refused.value)
    assert told == [ABORT_NOTICE_TASK]
    assert abort_asked(rt, job_id) == "aborted by operator"
    assert store.abort_requested(job_id) is None  # no flag: only the source's own look decides


def test_the_notice_gives_drovers_own_reason_and_the_flag_still_counts(
    rt: Runtime, store: JobStore
) -> None:
    """The kept notice's reason is drover's, never the record's words (probe: a Redis writer's
    line became the job's reason). The record's flag still counts beside it: a draining
    worker takes no message from its queue until it is back."""
    job_id = submit(store, "web07")
    store.request_abort(job_id, "a Redis writer's line")
    assert abort_asked(rt, job_id) == "a Redis writer's line"  # the flag, read as before
    note_abort(rt, job_id)  # the operator's notice, with drover's own reason
    assert abort_asked(rt, job_id) == "aborted by operator"
