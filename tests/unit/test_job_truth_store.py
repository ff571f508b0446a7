"""What a job record says once it moves on (against a real Redis): a resumed job is no longer
stalled for the old reason, a job that succeeded has no abort pending, and a migration in
post-copy is not aborted on a promise libvirt cannot keep."""

from __future__ import annotations

import pytest

from jobs.abort import TooLate, abort_job
from jobs.model import Job
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue

STALL = "kvm2's worker has not been seen for 30s while the job was migrating (finish)"


def submit(store: JobStore) -> str:
    spec = MigrationSpec(domain="web01", src="kvm1", dst="kvm2", live=True)
    return enqueue(store, spec, origin="test")


def walk(store: JobStore, job_id: str, *states: JobState) -> None:
    for state in states:
        moved, previous = store.transition(job_id, state, host="test")
        assert moved, f"{previous} -> {state}"


def no_rollback(_job: Job) -> None:
    raise AssertionError("nothing to roll back")


def test_leaving_stalled_clears_its_reason_and_origin(store: JobStore) -> None:
    job_id = submit(store)
    walk(store, job_id, JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING)
    store.transition(job_id, JobState.STALLED, host="kvm1", reason=STALL)
    assert store.get(job_id).stalled_from is JobState.MIGRATING
    walk(store, job_id, JobState.MIGRATING, JobState.FINISHING, JobState.SUCCEEDED)
    job = store.get(job_id)
    assert (job.reason, job.stalled_from) == (None, None)
    assert [t.reason for t in job.transitions if t.state is JobState.STALLED] == [STALL]


def test_a_stalled_job_that_fails_says_why_it_failed(store: JobStore) -> None:
    job_id = submit(store)
    store.transition(job_id, JobState.STALLED, host="kvm1", reason=STALL)
    store.transition(job_id, JobState.FAILED, host="kvm1", reason="preflight failed")
    job = store.get(job_id)
    assert (job.reason, job.stalled_from) == ("preflight failed", None)


def test_a_job_that_succeeds_keeps_no_pending_abort(store: JobStore) -> None:
    job_id = submit(store)
    walk(store, job_id, JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING)
    store.request_abort(job_id, "aborted by operator")
    walk(store, job_id, JobState.FINISHING, JobState.SUCCEEDED)
    assert store.get(job_id).abort_requested is None


def test_abort_in_post_copy_is_refused_and_nothing_is_requested(store: JobStore) -> None:
    job_id = submit(store)
    walk(store, job_id, JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING)
    store.mark_postcopy(job_id)
    with pytest.raises(TooLate, match="libvirt cannot abort a post-copy migration"):
        abort_job(store, job_id, by="test", rollback=no_rollback)
    job = store.get(job_id)
    assert job.abort_requested is None and job.postcopy_since is not None


def test_abort_in_pre_copy_is_requested(store: JobStore) -> None:
    job_id = submit(store)
    walk(store, job_id, JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING)
    said = abort_job(store, job_id, by="test", rollback=no_rollback)
    assert said.startswith("abort requested")
    assert store.get(job_id).abort_requested == "aborted by operator"
