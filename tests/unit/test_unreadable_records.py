"""Garbage in the Redis keys the keeper's duties read stops neither the duty nor the records
after it, and never buys more than the limits allow (docs/security.md: Redis says which job
to work on, never what to do to a host). Against the real test Redis."""

from __future__ import annotations

from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from jobs.admission import Admission, inbound_gate
from jobs.admission_head import BAD_PARENT_LIMIT
from jobs.evacuation import (
    ACTIVE_EVACUATIONS,
    EVACUATION_KIND,
    EvacuationSpec,
    EvacuationState,
    EvacuationStore,
)
from jobs.host_facts import HostFacts
from jobs.keys import BLOCKING_GATES, DISABLED_HOSTS, LANES_READY, evacuation_retries_key, job_key
from jobs.maintenance import UNREADABLE_ENTRY, Maintenance
from jobs.record import MalformedRecord, SourceFacts
from jobs.reservation_read import reserved_by_host
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import ACTIVE_JOBS, JobStore, reservations_key
from tests.conftest import RedisServer
from tests.unit.test_admission import settings, submit
from worker import evacuation_watch, keeper, recovery
from worker.host_memory import room_mib
from worker.runtime import Runtime

BAD_ID = "000000000000"  # sorts before any id drover makes: read first
LIMIT_MIB = 1024


def runtime(store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    return Runtime(host="kvm1", store=store, libvirt=cast(Any, None), ledger=cast(Any, None))


def unreadable(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "record.unreadable"]


def bad_record(store: JobStore, kind: str, **fields: str) -> None:
    ts = datetime.now(UTC).isoformat()
    record = {"id": BAD_ID, "kind": kind, "state": "queued", "created": ts, "updated": ts}
    store.r.hset(job_key(BAD_ID), mapping=record | fields)


# --- A: the evacuations duty ----------------------------------------------------------------


def test_an_unreadable_evacuation_is_said_once_and_the_others_are_attended(
    store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime(store, config, monkeypatch)
    evacuations = EvacuationStore(store)
    good = evacuations.create(EvacuationSpec(host="kvm1"), "test")
    evacuations.request_abort(good, "stop")
    bad_record(store, EVACUATION_KIND, spec="{bad", origin="x")
    store.r.sadd(ACTIVE_EVACUATIONS, BAD_ID)

    with capture_logs() as logs:
        evacuation_watch.watch(rt)

    assert evacuations.get(good).state is EvacuationState.CANCELLED
    said = unreadable(logs)
    assert len(said) == 1 and said[0]["evacuation_id"] == BAD_ID
    assert "spec: Invalid JSON" in said[0]["reason"] and "\n" not in said[0]["reason"]
    with pytest.raises(MalformedRecord):
        evacuations.get(BAD_ID)


def test_a_retry_count_drover_did_not_write_counts_as_spent(store: JobStore) -> None:
    evacuations = EvacuationStore(store)
    ev = evacuations.create(EvacuationSpec(host="kvm1"), "test")
    store.r.hset(evacuation_retries_key(ev), mapping={"web01": "x", "web02": "-5"})
    assert not evacuations.take_retry(ev, "web01", 3)
    assert not evacuations.take_retry(ev, "web02", 3)
    assert evacuations.take_retry(ev, "web03", 3)


# --- B: admission ---------------------------------------------------------------------------


def test_an_unreadable_blocking_limit_stops_no_lane_and_admits_no_more_than_the_limit(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv)  # kvm2 takes one inbound migration at a time
    admission = Admission(store)
    first = submit(store, "web01", "kvm1", "kvm2")
    behind = submit(store, "web02", "kvm3", "kvm2")
    assert admission.pass_(cfg, lambda j, s: None) == [first]  # behind: blocked on kvm2
    other = submit(store, "db01", "kvm3", "kvm1")
    gate = inbound_gate("kvm2")
    store.r.hset(BLOCKING_GATES, mapping={gate: "lots", "drover:gate:nowhere": "-1"})

    with capture_logs() as logs:
        assert admission.pass_(cfg, lambda j, s: None) == [other]
    assert admission.holders(gate) == {first}  # tried against the registry's limit: refused
    assert store.r.hget(BLOCKING_GATES, gate) == "1"  # written back as the script knows it
    assert len(unreadable(logs)) == 1 and "nowhere" in unreadable(logs)[0]["field"]

    assert admission.safety_pass(cfg, lambda j, s: None) == []
    assert not store.r.hexists(BLOCKING_GATES, "drover:gate:nowhere")  # no lane waits on it
    store.transition(first, JobState.FAILED, host="test", reason="x")
    assert admission.pass_(cfg, lambda j, s: None) == [behind]


def test_a_child_with_an_unreadable_parent_limit_fails_alone(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv)
    child = submit(store, "vm0", "kvm1", "kvm3", parent="0123456789ab", parent_limit=1)
    other = submit(store, "db01", "kvm3", "kvm1")
    store.r.hset(job_key(child), "parent_limit", "x")
    store.r.zadd(LANES_READY, {"drover:lane:kvm1:kvm3:0123456789ab": 0})  # tried first

    assert Admission(store).safety_pass(cfg, lambda j, s: None) == [other]
    assert store.r.hget(job_key(child), "state") == JobState.FAILED.value
    assert store.r.hget(job_key(child), "reason") == BAD_PARENT_LIMIT


# --- C: reservations ------------------------------------------------------------------------


def test_a_reservation_that_is_not_a_whole_number_never_crashes_nor_adds_room(
    store: JobStore,
) -> None:
    spec = MigrationSpec(domain="web01", src="kvm1", dst="kvm2")
    live = store.create(spec, host="test")
    facts = SourceFacts(
        name="web01", uuid="u", state="running", active=True, persistent=True,
        memory_mib=300, vcpus=1,
    )  # fmt: skip
    store.r.hset(job_key(live), "facts", facts.model_dump_json())
    a, b, c, d = (
        store.create(MigrationSpec(domain=f"vm{i}", src="kvm1", dst="kvm2"), host="test")
        for i in range(4)
    )  # live jobs headed for kvm2, without recorded facts: only their bookings count
    store.r.hset(
        reservations_key("kvm2"),
        mapping={a: "64", b: "x", c: "-1000000", d: " 5", live: "lots"},
    )
    with capture_logs() as logs:
        assert store.reserved_mib("kvm2") == 64 + 300  # the live job's recorded need counts
        assert store.reserved_mib("kvm2", excluding=live) == 64
        assert reserved_by_host(store.r, ["kvm2"]) == {"kvm2": 64 + 300}
    assert len(unreadable(logs)) == 4 + 3 + 4  # each reading says each one


def test_the_registry_limit_caps_the_room_whatever_the_reservations_say() -> None:
    assert room_mib(1_000_000, 0, -1_000_000, LIMIT_MIB) == LIMIT_MIB
    assert room_mib(1_000_000, 512, -1_000_000, LIMIT_MIB) == LIMIT_MIB - 512
    assert room_mib(300, -5000, 0, LIMIT_MIB) == 300
    assert room_mib(4096, 0, 100, None) == 3996


def test_the_host_report_survives_bad_reservations_and_stays_under_the_limit(
    store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = config.read_text().replace(
        "[hosts.kvm1]\n", f"[hosts.kvm1]\nlimits = {{ memory_mib = {LIMIT_MIB} }}\n"
    )
    config.write_text(text)
    rt = runtime(store, config, monkeypatch)
    rt.libvirt = cast(Any, SimpleNamespace(conn=None))  # collect_facts, below, reads nothing
    facts = HostFacts(host="kvm1", worker="w", ts=datetime.now(UTC), free_mib=8192, active_mib=0)
    monkeypatch.setattr(keeper, "collect_facts", lambda *a: facts)
    store.r.hset(reservations_key("kvm1"), mapping={"a": "x", "b": "-1000000"})
    _, report = keeper.host_report(rt)
    assert report["free_mib"] == LIMIT_MIB and report["reserved_mib"] == 0


def test_an_unreadable_maintenance_entry_disables_its_host_and_no_other(store: JobStore) -> None:
    maintenance = Maintenance(store.r)
    maintenance.disable("kvm1", "disks", by="test")
    store.r.hset(DISABLED_HOSTS, mapping={"kvm2": "{bad", "kvm3": "[]"})
    disabled = maintenance.disabled()
    assert disabled["kvm1"].reason == "disks"
    assert disabled["kvm2"].reason == disabled["kvm3"].reason == UNREADABLE_ENTRY
    assert UNREADABLE_ENTRY in (maintenance.refusal("kvm2") or "")


# --- D: the recovery sweep (and every reader of a job record) ----------------------------------


def test_the_sweep_skips_a_job_record_it_cannot_read_and_goes_on(
    store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime(store, config, monkeypatch)
    spec = MigrationSpec(domain="web01", src="kvm1", dst="kvm2")
    ended = store.create(spec, host="test")
    store.transition(ended, JobState.FAILED, host="test", reason="x")
    store.r.sadd(ACTIVE_JOBS, ended)  # a crash between its end and the cleanup
    store.r.hset(reservations_key("kvm2"), ended, "64")
    bad_record(store, "migration", spec=spec.model_dump_json(), state="no-such-state")
    store.r.sadd(ACTIVE_JOBS, BAD_ID)

    recovery.sweep(rt)

    assert store.reserved_mib("kvm2") == 0 and store.active_ids() == [BAD_ID]
    with pytest.raises(MalformedRecord, match=f"job {BAD_ID}: its record cannot be read"):
        store.get(BAD_ID)
