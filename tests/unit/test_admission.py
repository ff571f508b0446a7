"""Admission against a real Redis: every limit at once or none, slots given back atomically."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import load_settings
from jobs.admission import CLUSTER_GATE, Admission, inbound_gate, outbound_gate
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import DomainBusy, enqueue
from tests.conftest import RedisServer

REGISTRY = """
redis_url = "{url}"
[cluster]
max_migrations = {cluster}
[hosts.kvm1]
peer_uri = "qemu+tcp://192.0.2.1/system"
migration_address = "192.0.2.1"
limits = {{ max_outbound = 2, max_inbound = 2 }}
[hosts.kvm2]
peer_uri = "qemu+tcp://192.0.2.2/system"
migration_address = "192.0.2.2"
limits = {{ max_outbound = 2, max_inbound = 1 }}
[hosts.kvm3]
peer_uri = "qemu+tcp://192.0.2.3/system"
migration_address = "192.0.2.3"
"""


def settings(tmp_path: Path, redis_srv: RedisServer, cluster: int = 8):  # type: ignore[no-untyped-def]
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url=redis_srv.url, cluster=cluster))
    return load_settings(path)


def submit(store: JobStore, domain: str, src: str, dst: str, **kw: object) -> str:
    spec = MigrationSpec(domain=domain, src=src, dst=dst)
    return enqueue(store, spec, origin="test", **kw)  # type: ignore[arg-type]


def test_inbound_limit_holds_and_a_slot_comes_back_when_the_job_ends(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv)
    started: list[str] = []
    a = submit(store, "web01", "kvm1", "kvm2")
    b = submit(store, "web02", "kvm3", "kvm2")  # kvm2 takes one at a time
    c = submit(store, "web03", "kvm1", "kvm3")  # not held up by b
    admission = Admission(store)
    assert admission.safety_pass(cfg, lambda j, s: started.append(j)) == [a, c]
    assert started == [a, c]
    assert store.get(b).waiting_for == "waiting for a slot: kvm2 inbound limit 1 reached"
    waiting = [e for _, e in store.read_events(b) if e["event"] == "job.waiting"]
    assert len(waiting) == 1
    admission.safety_pass(cfg, lambda j, s: started.append(j))
    assert len([e for _, e in store.read_events(b) if e["event"] == "job.waiting"]) == 1
    assert admission.holders(inbound_gate("kvm2")) == {a}
    assert admission.holders(outbound_gate("kvm1")) == {a, c}
    assert admission.holders(CLUSTER_GATE) == {a, c}

    store.transition(a, JobState.FAILED, host="test", reason="x")  # ends: slots given back
    assert a not in admission.holders(inbound_gate("kvm2")) | admission.holders(CLUSTER_GATE)
    assert admission.safety_pass(cfg, lambda j, s: started.append(j)) == [b]
    job = store.get(b)
    assert job.admitted is not None and job.waiting_for is None


def test_cluster_and_evacuation_limits(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv, cluster=1)
    a = submit(store, "web01", "kvm1", "kvm3")
    b = submit(store, "web02", "kvm2", "kvm1")
    admission = Admission(store)
    assert admission.safety_pass(cfg, lambda j, s: None) == [a]
    assert "cluster-wide limit 1 reached" in (store.get(b).waiting_for or "")

    store.r.flushdb()
    cfg = settings(tmp_path, redis_srv)
    kids = [
        submit(store, f"vm{i}", "kvm1", "kvm3", parent="0123456789ab", parent_limit=1)
        for i in range(2)
    ]
    assert Admission(store).safety_pass(cfg, lambda j, s: None) == [kids[0]]
    assert "evacuation 0123456789ab limit 1 reached" in (store.get(kids[1]).waiting_for or "")


def test_aborted_or_ended_waiting_jobs_leave_the_line(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv)
    a = submit(store, "web01", "kvm1", "kvm2")
    store.transition(a, JobState.CANCELLED, host="test", reason="aborted")
    admission = Admission(store)
    assert admission.waiting_ids() == []
    b = submit(store, "web02", "kvm1", "kvm2")
    store.request_abort(b, "aborted")  # an abort cut short before its transition
    assert admission.safety_pass(cfg, lambda j, s: None) == []
    assert admission.waiting_ids() == []
    assert store.state(b) is JobState.CANCELLED  # finished by admission, not left queued
    assert not store.r.hget("drover:host:kvm2:reservations", b)


def test_a_slot_held_by_a_vanished_job_is_pruned(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv)
    store.r.sadd(inbound_gate("kvm2"), "deadbeef0000")  # a crash left it; no such job
    a = submit(store, "web01", "kvm1", "kvm2")
    assert Admission(store).safety_pass(cfg, lambda j, s: None) == [a]
    assert Admission(store).holders(inbound_gate("kvm2")) == {a}


def test_ending_a_job_gives_back_its_reservations(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = submit(store, "web01", "kvm1", "kvm2", reserve_mib=64)
    assert store.reserved_mib("kvm2") == 64
    # As if the process died right after the transition, before its clean-up in Python.
    monkeypatch.setattr(store, "release_holds", lambda job_id: None)
    moved, _ = store.transition(job, JobState.FAILED, host="test", reason="x")
    assert moved and store.reserved_mib("kvm2") == 0  # released by the transition itself


def test_cancel_only_from_the_state_read(store: JobStore) -> None:
    job = submit(store, "web01", "kvm1", "kvm2")
    store.transition(job, JobState.PREFLIGHT, host="test")
    moved, current = store.transition(
        job, JobState.CANCELLED, host="test", only_from=JobState.QUEUED
    )
    assert not moved and current is JobState.PREFLIGHT


def test_one_live_job_per_domain(store: JobStore) -> None:
    submit(store, "web01", "kvm1", "kvm2")
    with pytest.raises(DomainBusy, match="web01 already has an active job"):
        submit(store, "web01", "kvm1", "kvm3")
