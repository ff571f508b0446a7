"""An ended job waits for nothing: what it waited for goes with its end.

Seen on the lab: a job recovery settled as failed kept saying "lab1's worker is shutting
down ... perform waits for a worker on lab1" in `drover job`, since only a phase's start
cleared it and a recovered phase has no new start.
"""

from __future__ import annotations

from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore


def test_a_job_that_ends_no_longer_says_what_it_waited_for(store: JobStore) -> None:
    job_id = store.create(MigrationSpec(domain="web01", src="kvm1", dst="kvm2"), host="test")
    for state in (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING):
        store.transition(job_id, state, host="test")
    store.set_waiting_for(job_id, "lab1's worker is shutting down")
    assert store.get(job_id).waiting_for == "lab1's worker is shutting down"
    store.transition(job_id, JobState.STALLED, host="test", reason="kvm1 away")
    assert store.get(job_id).waiting_for is not None  # not ended: still waiting
    moved, _ = store.transition(job_id, JobState.FAILED, host="test", reason="a fault")
    assert moved
    job = store.get(job_id)
    assert job.waiting_for is None and job.shown_reason() == "a fault"
