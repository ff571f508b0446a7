"""A job's end against a shared key written by hand to another type than drover gives it
(anyone with the Redis password: `SET drover:jobs:state:failed x`). The retention's end script
(jobs/retention.py) runs in the transition's MULTI, after the state is written, and Redis
undoes nothing of a script that fails midway: each key of another type is passed over, and the
rest of the end is done: the record takes its retention, its other leases are given back, its
producer's count and the other indexes are kept right, the key is left as found, and the
caller is told of no error. Against the real test Redis."""

from __future__ import annotations

from typing import cast

import pytest

from jobs.evacuation import EvacuationSpec, EvacuationState, EvacuationStore
from jobs.keys import (
    JOBS_INDEX,
    domain_lock_key,
    jobs_by_host_key,
    jobs_by_state_key,
    record_keys,
    waiting_by_origin_key,
)
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import DEFAULT_RETENTION_S, JobStore
from jobs.submission import enqueue

OLD = "old-job"  # an index entry created twice the retention ago: each end trims it
NAME_LEASE = domain_lock_key("name", "web01")
UUID_LEASE = domain_lock_key("uuid", "uuid-web01")
INDEXES = [
    JOBS_INDEX,
    jobs_by_state_key(JobState.FAILED.value),
    jobs_by_host_key("kvm1"),
    jobs_by_host_key("kvm2"),
]
GUARDED = {
    "a lease the job holds": UUID_LEASE,
    "its producer's waiting count": waiting_by_origin_key("p1"),
    "every record": JOBS_INDEX,
    "its final state's index": jobs_by_state_key(JobState.FAILED.value),
    "its source's index": jobs_by_host_key("kvm1"),
    "its destination's index": jobs_by_host_key("kvm2"),
}


def spoil(store: JobStore, key: str, job_id: str) -> None:
    """A lock becomes a list naming the job (no lease of it); a set or index a string."""
    store.r.delete(key)
    if key == UUID_LEASE:
        store.r.rpush(key, job_id)
    else:
        store.r.set(key, job_id)


def as_found(store: JobStore, key: str) -> object:
    return store.r.lrange(key, 0, -1) if key == UUID_LEASE else store.r.get(key)


def left_wrong(store: JobStore, job_id: str, spoilt: str) -> list[str]:
    """What the end should have done and did not (the spoilt key aside)."""
    r = store.r
    wrong = [k for k in record_keys(job_id) if r.exists(k) and cast(int, r.ttl(k)) <= 0]
    if r.get(NAME_LEASE) is not None:
        wrong.append(NAME_LEASE)
    if spoilt != UUID_LEASE and r.get(UUID_LEASE) is not None:
        wrong.append(UUID_LEASE)
    counted = waiting_by_origin_key("p1")
    if spoilt != counted and r.sismember(counted, job_id):
        wrong.append(counted)
    for index in INDEXES:
        if index != spoilt and r.zscore(index, OLD) is not None:
            wrong.append(f"{index} untrimmed")
    filed = jobs_by_state_key(JobState.FAILED.value)
    if spoilt != filed and r.zscore(filed, job_id) is None:
        wrong.append(f"{filed} without the job")
    return wrong


@pytest.mark.parametrize("what", list(GUARDED))
def test_a_job_ends_wholly_whatever_shared_key_is_of_another_type(
    store: JobStore, what: str
) -> None:
    job_id = enqueue(
        store, MigrationSpec(domain="web01", src="kvm1", dst="kvm2"), origin="p1", max_waiting=5
    )
    assert store.take_lease(UUID_LEASE, job_id) is None
    assert store.r.sismember(waiting_by_origin_key("p1"), job_id)
    long_ago = cast(float, store.r.zscore(JOBS_INDEX, job_id)) - 2 * DEFAULT_RETENTION_S
    for index in INDEXES:
        store.r.zadd(index, {OLD: long_ago})
    key = GUARDED[what]
    spoil(store, key, job_id)

    # The store's transition: the records' one with the retention's end in its MULTI
    # (WRONGTYPE before), then the store's own lease release (jobs/liveness.py), which reads
    # every lock again and passes over one of another type too.
    moved, previous = store.transition(job_id, JobState.FAILED, host="p1", reason="x")

    assert (moved, previous) == (True, JobState.QUEUED)
    assert store.state(job_id) is JobState.FAILED
    assert left_wrong(store, job_id, key) == []
    assert as_found(store, key) in ([job_id], job_id)  # left as found


def test_an_evacuations_end_trims_its_hosts_index(store: JobStore) -> None:
    """Not a hostile key: the end script walked a job's src, dst then host, and stopped at an
    evacuation's missing src, so a host only evacuated kept entries past the retention."""
    evacuations = EvacuationStore(store)
    ev = evacuations.create(EvacuationSpec(host="kvm3"), "p1")
    long_ago = cast(float, store.r.zscore(JOBS_INDEX, ev)) - 2 * DEFAULT_RETENTION_S
    store.r.zadd(jobs_by_host_key("kvm3"), {OLD: long_ago})
    for state in (EvacuationState.PLANNING, EvacuationState.RUNNING, EvacuationState.PARTIAL):
        assert evacuations.transition(ev, state)[0]

    assert store.r.zscore(jobs_by_host_key("kvm3"), OLD) is None
    assert store.r.zscore(jobs_by_host_key("kvm3"), ev) is not None
