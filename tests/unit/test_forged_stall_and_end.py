"""Ends written into a job's record by hand while it migrates (attacker probe, every Redis
password): a `stalled_from` of `succeeded` made the owner's recovery end a job whose guest
was still migrating; a `succeeded` written during perform stayed when the migration then
failed, on a guest libvirt kept on its source. Real test Redis and ledger.
"""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from jobs.keys import job_key
from jobs.phases import Phase
from jobs.states import JobState
from jobs.store import JobStore
from tests.unit.test_forged_admission import admit, rt, submit
from worker import recovery
from worker.job_end import fail_job
from worker.runtime import Runtime

__all__ = ["rt"]  # a fixture, used by name


def stalled_in_perform(rt: Runtime, store: JobStore) -> str:
    """kvm1's job in its perform, marked stalled (its owner judged gone), the perform
    running in this process (so that recovery does no more than the owner's return)."""
    job_id = submit(store, "idle-1")
    assert admit(rt) == [job_id]
    for state in (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING):
        assert store.transition(job_id, state, host="kvm1")[0]
    for phase in (Phase.SOURCE_PREFLIGHT, Phase.DESTINATION_PREPARE):
        store.phase_started(job_id, phase.value, "kvm1")
        store.phase_ended(job_id, phase.value)
    store.phase_started(job_id, Phase.PERFORM.value, "kvm1")
    assert store.transition(job_id, JobState.STALLED, host="kvm2", reason="kvm1 unseen")[0]
    assert rt.begin(job_id, Phase.PERFORM.value) is None
    return job_id


@pytest.mark.parametrize("forged", ["succeeded", "checked", "failed", "queued", "stalled"])
def test_a_stall_written_to_end_in_an_end_is_not_followed(
    rt: Runtime, store: JobStore, forged: str
) -> None:
    job_id = stalled_in_perform(rt, store)
    store.r.hset(job_key(job_id), "stalled_from", forged)
    with capture_logs() as logs:
        recovery.sweep(rt)
    job = store.get(job_id)
    assert job.state is JobState.STALLED and not job.terminal
    assert not [e for e in logs if e["event"] == "job.state"]


def test_the_owner_back_returns_a_stalled_job_to_where_it_stalled(
    rt: Runtime, store: JobStore
) -> None:
    job_id = stalled_in_perform(rt, store)
    recovery.sweep(rt)
    assert store.get(job_id).state is JobState.MIGRATING


@pytest.mark.parametrize("forged", [JobState.SUCCEEDED, JobState.CHECKED])
def test_a_failing_perform_takes_back_an_end_no_step_before_finish_enters(
    rt: Runtime, store: JobStore, forged: JobState
) -> None:
    """The migration failed (the guest stays on kvm1): the job ends failed, not `succeeded`."""
    job_id = stalled_in_perform(rt, store)
    store.r.hset(job_key(job_id), "state", forged.value)
    with capture_logs() as logs:
        fail_job(rt, store.get(job_id), Phase.PERFORM, "migration to kvm2 failed: aborted")
    job = store.get(job_id)
    assert job.state is JobState.FAILED and job.reason == "migration to kvm2 failed: aborted"
    (taken_back,) = [e for e in logs if e["event"] == "job.reopened"]
    assert taken_back["previous"] == forged.value
    assert [t.state for t in job.transitions[-2:]] == [JobState.MIGRATING, JobState.FAILED]


def test_an_end_after_finish_is_not_taken_back_by_a_failing_confirm(
    rt: Runtime, store: JobStore
) -> None:
    """After finish, a succeeded record is drover's own (confirm enters it): it stands."""
    job_id = stalled_in_perform(rt, store)
    store.r.hset(job_key(job_id), "state", JobState.SUCCEEDED.value)
    with capture_logs() as logs:
        fail_job(rt, store.get(job_id), Phase.CONFIRM, "confirm failed")
    assert store.get(job_id).state is JobState.SUCCEEDED
    assert not [e for e in logs if e["event"] == "job.reopened"]
