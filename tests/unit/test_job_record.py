"""The typed job record and the one transition script, against a real Redis."""

from __future__ import annotations

import json
import time

import pytest

from jobs.evacuation import EvacuationSpec, EvacuationState, EvacuationStore
from jobs.follow import wait_for_end
from jobs.keys import (
    ACTIVE_EVACUATIONS,
    ACTIVE_JOBS,
    CLUSTER_GATE,
    WAITING,
    job_key,
    reservations_key,
    transitions_key,
)
from jobs.record import DiskFacts, Handoff, MalformedRecord, Result, SourceFacts
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore

FACTS = SourceFacts(
    name="web01",
    uuid="6f1c1a5e-0000-4000-8000-000000000001",
    state="running",
    active=True,
    persistent=True,
    memory_mib=512,
    vcpus=2,
)


def new_job(store: JobStore) -> str:
    spec = MigrationSpec.model_validate({"domain": "web01", "src": "kvm1", "dst": "kvm2"})
    return store.create(spec, host="test")


def test_the_record_reads_back_typed_as_the_phases_wrote_it(store: JobStore) -> None:
    job_id = new_job(store)
    fresh = store.get(job_id)
    assert fresh.facts is None and fresh.handoff == Handoff() and fresh.result == Result()
    disks = [DiskFacts(path="/var/lib/libvirt/images/web01.qcow2", format="qcow2", capacity=1)]
    store.update(job_id, facts=FACTS.model_copy(update={"disks": disks}))
    store.update(job_id, facts={"dest_config_present": True})  # the destination's addition
    handoff = Handoff(dconnuri="qemu+tls://kvm2/system", migrate_uri="tcp://10.0.0.2")
    store.update(job_id, handoff=handoff.model_copy(update={"created_images": ["/a.qcow2"]}))
    store.update(job_id, result={"migration_ms": 1234.5})
    store.update(job_id, result={"source_defined": False})
    job = store.get(job_id)
    assert job.source == FACTS.model_copy(update={"disks": disks, "dest_config_present": True})
    assert job.handoff.dconnuri == "qemu+tls://kvm2/system"
    assert job.handoff.created_images == ["/a.qcow2"]
    assert job.result.migration_ms == 1234.5 and job.result.source_defined is False
    # The stored shape is what it always was: one JSON object per field, defaults left out.
    stored = json.loads(str(store.r.hget(job_key(job_id), "facts")))
    assert stored["uuid"] == FACTS.uuid and stored["dest_config_present"] is True
    assert "listen_address" not in json.loads(str(store.r.hget(job_key(job_id), "handoff")))


def test_a_phase_reading_facts_before_preflight_is_told_so(store: JobStore) -> None:
    job = store.get(new_job(store))
    with pytest.raises(MalformedRecord, match="no facts of the source"):
        _ = job.source


@pytest.mark.parametrize(
    ("field", "raw", "message"),
    [
        ("facts", '{"uuid": 7}', "facts is not a valid record: name: Field required"),
        ("facts", "not json", "facts is not a valid record"),
        ("handoff", '{"created_images": "/etc/passwd"}', "handoff is not a valid record"),
        ("result", '{"migration_ms": "fast"}', "result is not a valid record: migration_ms"),
    ],
)
def test_a_malformed_record_is_refused_with_a_clear_error(
    store: JobStore, field: str, raw: str, message: str
) -> None:
    job_id = new_job(store)
    store.r.hset(job_key(job_id), field, raw)
    with pytest.raises(MalformedRecord) as exc:
        store.get(job_id)
    assert str(exc.value).startswith(f"job {job_id}: ") and message in str(exc.value)


def test_a_write_that_would_not_read_back_is_refused(store: JobStore) -> None:
    job_id = new_job(store)
    with pytest.raises(MalformedRecord, match="refusing to write facts"):
        store.update(job_id, facts={"uuid": "only-a-uuid"})
    assert store.r.hget(job_key(job_id), "facts") is None


def test_ending_a_job_gives_everything_back_in_the_script(store: JobStore) -> None:
    job_id = new_job(store)
    store.r.zadd(WAITING, {job_id: 1})
    store.r.sadd(CLUSTER_GATE, job_id)
    store.r.hset(job_key(job_id), "gates", CLUSTER_GATE)
    assert store.reserve("kvm1", job_id, 64) and store.reserve("kvm2", job_id, 64)
    # The script alone (JobRecords.transition, not the facade that also drops leases).
    moved, previous = super(JobStore, store).transition(job_id, JobState.FAILED, host="t")
    assert moved and previous is JobState.QUEUED
    assert not store.r.sismember(ACTIVE_JOBS, job_id)
    assert store.r.zscore(WAITING, job_id) is None
    assert not store.r.sismember(CLUSTER_GATE, job_id)
    assert store.r.hlen(reservations_key("kvm1")) == store.r.hlen(reservations_key("kvm2")) == 0
    assert len(store.r.lrange(transitions_key(job_id), 0, -1)) == 2


def test_a_stall_is_entered_and_left_as_the_state_table_says(store: JobStore) -> None:
    job_id = new_job(store)
    store.transition(job_id, JobState.PREFLIGHT, host="t")
    store.request_abort(job_id, "operator")
    assert store.transition(job_id, JobState.STALLED, host="t", reason="kvm1 gone")[0]
    stalled = store.get(job_id)
    assert stalled.stalled_from is JobState.PREFLIGHT and stalled.reason == "kvm1 gone"
    assert store.transition(job_id, JobState.PREPARED, host="t")[0]
    resumed = store.get(job_id)
    assert resumed.stalled_from is None and resumed.reason is None
    assert resumed.abort_requested == "operator"  # only success drops a pending abort
    for state in (JobState.MIGRATING, JobState.FINISHING, JobState.SUCCEEDED):
        assert store.transition(job_id, state, host="t")[0]
    assert store.get(job_id).abort_requested is None


def test_the_same_script_moves_an_evacuation_by_its_own_table(store: JobStore) -> None:
    evacuations = EvacuationStore(store)
    ev_id = evacuations.create(EvacuationSpec(host="kvm1"), "test")
    refused = evacuations.transition(ev_id, EvacuationState.RUNNING)
    assert refused == (False, EvacuationState.QUEUED)  # queued -> running skips planning
    assert evacuations.transition(ev_id, EvacuationState.PLANNING) == (
        True,
        EvacuationState.QUEUED,
    )
    assert evacuations.transition(ev_id, EvacuationState.PLANNING) == (
        False,
        EvacuationState.PLANNING,
    )
    assert evacuations.transition(ev_id, EvacuationState.FAILED, "no plan")[0]
    ev = evacuations.get(ev_id)
    assert ev.terminal and ev.reason == "no plan"
    assert not store.r.sismember(ACTIVE_EVACUATIONS, ev_id)
    assert store.r.exists(transitions_key(ev_id)) == 0  # an evacuation keeps no history list
    assert ev.summary()["kind"] == "evacuation" and ev.summary()["src"] == "kvm1"


def test_a_wait_ends_at_the_end_event_or_after_the_grace(store: JobStore) -> None:
    job_id = new_job(store)
    store.transition(job_id, JobState.FAILED, host="t")
    store.append_event(job_id, {"event": "job.state", "state": "failed"})
    ended = lambda: store.state(job_id).value == "failed"  # noqa: E731
    assert wait_for_end(store, job_id, ended, block_ms=50) == {
        "event": "job.state",
        "state": "failed",
    }
    silent = new_job(store)  # ended, but its worker never wrote the event
    store.transition(silent, JobState.FAILED, host="t")
    started = time.monotonic()
    found = wait_for_end(
        store, silent, lambda: store.state(silent).value == "failed", block_ms=50, grace_s=0.3
    )
    assert found is None and 0.3 <= time.monotonic() - started < 5
    live = new_job(store)
    with pytest.raises(TimeoutError, match=f"job {live} still queued after 0.2s"):
        wait_for_end(
            store,
            live,
            lambda: False,
            state=lambda: store.state(live).value,
            block_ms=50,
            timeout=0.2,
        )
