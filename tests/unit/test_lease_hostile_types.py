"""Compare-and-delete against a lock, mark or heartbeat key written by hand to another type
(anyone with the Redis password: `HSET drover:lock:uuid:... x y`). The store gives a job's
leases back straight after its end (jobs/liveness.py `release_leases`): a GET there raised
WRONGTYPE after the end was written, so the caller of a terminal transition (a phase ending
its job, recovery) saw an error for a job that had ended. Such a key is no holder's: passed
over, left as found, every other lease given back. Against the real test Redis."""

from __future__ import annotations

import pytest

from jobs.keys import domain_lock_key, heartbeat_key, runner_key
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore

NAME_LEASE = domain_lock_key("name", "web01")
UUID_LEASE = domain_lock_key("uuid", "uuid-web01")


def leased_job(store: JobStore) -> str:
    job_id = store.create(MigrationSpec(domain="web01", src="kvm1", dst="kvm2"), host="p1")
    assert store.take_lease(NAME_LEASE, job_id) is None
    assert store.take_lease(UUID_LEASE, job_id) is None
    return job_id


def spoil(store: JobStore, key: str, kind: str) -> object:
    """`key` rewritten as a hash or a list; what it then holds, to compare with after."""
    store.r.delete(key)
    if kind == "hash":
        store.r.hset(key, "by", "hand")
        return store.r.hgetall(key)
    store.r.rpush(key, "by hand")
    return store.r.lrange(key, 0, -1)


def found(store: JobStore, key: str, kind: str) -> object:
    return store.r.hgetall(key) if kind == "hash" else store.r.lrange(key, 0, -1)


@pytest.mark.parametrize("kind", ["hash", "list"])
def test_a_job_ends_without_error_past_a_lock_of_another_type(store: JobStore, kind: str) -> None:
    job_id = leased_job(store)
    before = spoil(store, UUID_LEASE, kind)

    moved, previous = store.transition(job_id, JobState.FAILED, host="p1", reason="x")

    assert (moved, previous) == (True, JobState.QUEUED)
    assert store.state(job_id) is JobState.FAILED
    assert store.r.get(NAME_LEASE) is None  # its other lease given back
    assert found(store, UUID_LEASE, kind) == before  # left as found


@pytest.mark.parametrize("kind", ["hash", "list"])
def test_a_finished_jobs_holds_are_given_back_past_a_lock_of_another_type(
    store: JobStore, kind: str
) -> None:
    """Recovery's sweep of what an ended job still holds (release_holds) goes on too."""
    job_id = leased_job(store)
    store.transition(job_id, JobState.FAILED, host="p1", reason="x")
    store.r.set(NAME_LEASE, job_id)  # a lease left by a crash between the end and its release
    before = spoil(store, UUID_LEASE, kind)

    store.release_holds(job_id)

    assert store.r.get(NAME_LEASE) is None
    assert found(store, UUID_LEASE, kind) == before


@pytest.mark.parametrize("kind", ["hash", "list"])
def test_a_worker_leaving_or_ending_a_phase_passes_over_marks_of_another_type(
    store: JobStore, kind: str
) -> None:
    heartbeat = spoil(store, heartbeat_key("kvm1"), kind)
    mark = spoil(store, runner_key("job-1", "perform"), kind)

    store.drop_heartbeat("kvm1", "w1")
    store.drop_runner("job-1", "perform", "w1")

    assert found(store, heartbeat_key("kvm1"), kind) == heartbeat
    assert found(store, runner_key("job-1", "perform"), kind) == mark
