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
from worker import phases_all_ended, recovery
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


class Seen:
    """What `locate` reads of libvirt on both hosts: landed or not."""

    def __init__(self, landed: bool) -> None:
        self.landed = landed

    def describe(self) -> str:
        return "idle-1 is shut off on kvm1, running on kvm2" if self.landed else "on kvm1"


def all_phases_ended(rt: Runtime, store: JobStore, forged: str) -> str:
    """A job whose every phase ended (its guest moved), its record then written `forged`."""
    job_id = stalled_in_perform(rt, store)
    rt.end(job_id, Phase.PERFORM.value)
    store.r.hset(job_key(job_id), "state", JobState.FINISHING.value)
    store.phase_ended(job_id, Phase.PERFORM.value)
    for phase in (Phase.FINISH, Phase.CONFIRM):
        store.phase_started(job_id, phase.value, "kvm1")
        store.phase_ended(job_id, phase.value)
    store.r.hset(job_key(job_id), "state", forged)
    return job_id


@pytest.mark.parametrize("forged", ["postcopy_paused", "postcopy_recovering", "migrating"])
def test_a_live_job_with_every_phase_ended_ends_as_libvirt_shows(
    rt: Runtime, store: JobStore, forged: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's write wedged the job for good: finish and confirm skipped, the guest's
    lease held, no abort, no new migration. The source's recovery ends it by libvirt."""
    job_id = all_phases_ended(rt, store, forged)
    monkeypatch.setattr(phases_all_ended, "locate", lambda *_: Seen(landed=True))
    with capture_logs() as logs:
        recovery.sweep(rt)
    job = store.get(job_id)
    assert job.state is JobState.SUCCEEDED
    (taken_back,) = [e for e in logs if e["event"] == "job.reopened"]
    assert taken_back["previous"] == forged and "running on kvm2" in taken_back["reason"]


def test_nothing_is_ended_on_a_records_word_when_libvirt_does_not_show_the_landing(
    rt: Runtime, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = all_phases_ended(rt, store, "postcopy_paused")
    monkeypatch.setattr(phases_all_ended, "locate", lambda *_: Seen(landed=False))
    with capture_logs() as logs:
        recovery.sweep(rt)
    assert store.get(job_id).state is JobState.POSTCOPY_PAUSED
    (said,) = [e for e in logs if e["event"] == "job.contradicted"]
    assert "left as it is" in said["reason"]
