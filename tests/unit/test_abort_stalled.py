"""`drover abort` of a stalled job (its owner's worker away) judges it by the state it stalled
in, never by `stalled` alone: a job stalled once libvirt's migration call returned well is past
abort, one stalled in its migration only gets the request (its source's worker, back, aborts it
in libvirt or finds it completed), and only one stalled before its migration is cancelled.
Against the real test Redis. (Before: every stalled job was cancelled and rolled back, though
libvirt showed the guest running on its destination.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from jobs.abort import TooLate, abort_job
from jobs.model import Job
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue

FORWARD = (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING, JobState.FINISHING)


def stalled_in(store: JobStore, state: JobState, *, perform_ended: bool = False) -> str:
    job_id = enqueue(store, MigrationSpec(domain="web01", src="kvm1", dst="kvm2"), origin="t")
    for step in FORWARD[: FORWARD.index(state) + 1]:
        assert store.transition(job_id, step, host="kvm1")[0]
    if state in (JobState.MIGRATING, JobState.FINISHING):
        store.phase_started(job_id, "perform", "kvm1")
        if perform_ended:
            store.phase_ended(job_id, "perform")
    why = "kvm2's worker has not been seen for 30s while the job was migrating (finish)"
    assert store.transition(job_id, JobState.STALLED, host="kvm1", reason=why)[0]
    assert store.get(job_id).stalled_from is state
    return job_id


def sent(rollbacks: list[str]) -> Callable[[Job], None]:
    def rollback(job: Job) -> None:
        rollbacks.append(job.id)

    return rollback


@pytest.mark.parametrize(
    ("state", "perform_ended"),
    [(JobState.FINISHING, True), (JobState.MIGRATING, True)],
)
def test_stalled_after_libvirt_completed_the_migration_is_too_late(
    store: JobStore, state: JobState, perform_ended: bool
) -> None:
    rollbacks: list[str] = []
    job_id = stalled_in(store, state, perform_ended=perform_ended)
    with pytest.raises(TooLate, match="is finishing: libvirt completed the migration of web01"):
        abort_job(store, job_id, by="test", rollback=sent(rollbacks))
    job = store.get(job_id)
    assert job.state is JobState.STALLED and job.abort_requested is None and rollbacks == []


def test_stalled_in_its_migration_only_gets_the_request(store: JobStore) -> None:
    rollbacks: list[str] = []
    job_id = stalled_in(store, JobState.MIGRATING)
    said = abort_job(store, job_id, by="test", rollback=sent(rollbacks))
    assert said.startswith(f"abort requested: job {job_id} is stalled")
    assert "kvm1's worker aborts the migration of web01 when it is back" in said
    job = store.get(job_id)
    assert job.state is JobState.STALLED and job.abort_requested and rollbacks == []


def test_stalled_before_its_migration_is_cancelled_and_rolled_back(store: JobStore) -> None:
    rollbacks: list[str] = []
    job_id = stalled_in(store, JobState.PREPARED)
    said = abort_job(store, job_id, by="test", rollback=sent(rollbacks))
    assert said == f"job {job_id} cancelled (stalled)"
    assert store.get(job_id).state is JobState.CANCELLED and rollbacks == [job_id]
