"""A Redis key of another type than drover writes stops no keeper duty: one record's key is
that record's MalformedRecord (skipped, `record.unreadable`), one job's or evacuation's other
failure is said for it alone (`keeper.error`), and a shared set of live ids that is not a set
is said at each pass (`keeper.key_unreadable`) instead of a Redis outage. Against the real
test Redis (anyone with the Redis password can SET any of these keys to a string)."""

from __future__ import annotations

from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from structlog.testing import capture_logs

from jobs.evacuation import (
    ACTIVE_EVACUATIONS,
    EVACUATION_KIND,
    EvacuationSpec,
    EvacuationState,
    EvacuationStore,
)
from jobs.keys import children_key, job_key, phases_key, transitions_key
from jobs.record import MalformedRecord
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import ACTIVE_JOBS, JobStore, reservations_key
from worker import evacuation_watch, keeper, recovery
from worker.runtime import Runtime

BAD_ID = "000000000000"  # sorts before any id drover makes: attended first


def runtime(store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    return Runtime(host="kvm1", store=store, libvirt=cast(Any, None), ledger=cast(Any, None))


def said(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def ended_job_left_active(store: JobStore) -> str:
    """A job that ended but is still in the live set with memory booked (a crash between its
    end and its cleanup): the sweep gives its holds back, if it reaches it."""
    ended = store.create(MigrationSpec(domain="web01", src="kvm1", dst="kvm2"), host="test")
    store.transition(ended, JobState.FAILED, host="test", reason="x")
    store.r.sadd(ACTIVE_JOBS, ended)
    store.r.hset(reservations_key("kvm2"), ended, "64")
    return ended


def job_record(store: JobStore, job_id: str) -> None:
    """A whole, readable migration record of `job_id`, live."""
    ts = datetime.now(UTC).isoformat()
    spec = MigrationSpec(domain="web02", src="kvm1", dst="kvm2").model_dump_json()
    record = {"id": job_id, "spec": spec, "state": "queued", "created": ts, "updated": ts}
    store.r.hset(job_key(job_id), mapping=record)
    store.r.sadd(ACTIVE_JOBS, job_id)


# --- one job's keys (finding 2) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("wrong", "expected"),
    [(job_key, "hash"), (phases_key, "hash"), (transitions_key, "list")],
    ids=["record", "phases", "transitions"],
)
def test_a_job_key_of_another_type_is_that_job_s_unreadable_record(
    store: JobStore,
    config: Path,
    monkeypatch: pytest.MonkeyPatch,
    wrong: Any,
    expected: str,
) -> None:
    rt = runtime(store, config, monkeypatch)
    ended = ended_job_left_active(store)
    job_record(store, BAD_ID)
    store.r.delete(wrong(BAD_ID))
    store.r.set(wrong(BAD_ID), "x")

    with capture_logs() as logs:
        recovery.sweep(rt)  # raised WRONGTYPE before, and never reached the job after it

    assert store.reserved_mib("kvm2") == 0 and ended not in store.active_ids()
    (entry,) = said(logs, "record.unreadable")
    assert entry["key"] == job_key(BAD_ID)
    assert f"{wrong(BAD_ID)} is a string, not a {expected}" in entry["reason"]
    with pytest.raises(MalformedRecord, match=f"job {BAD_ID}: its record cannot be read"):
        store.get(BAD_ID)


def test_one_job_failing_otherwise_is_said_alone_and_the_sweep_goes_on(
    store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A readable ended job whose clean-up fails (an error from Redis, a bug): for that job
    only. (A lease naming a key of another type no longer fails it: 19a2736 passes over such
    a key, so the failure is made here.)"""
    rt = runtime(store, config, monkeypatch)
    ended = ended_job_left_active(store)
    job_record(store, BAD_ID)
    store.r.hset(job_key(BAD_ID), mapping={"state": "failed"})
    release = rt.store.release_holds

    def failing_for_one(job_id: str) -> None:
        if job_id == BAD_ID:
            raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")
        release(job_id)

    monkeypatch.setattr(rt.store, "release_holds", failing_for_one)

    with capture_logs() as logs:
        recovery.sweep(rt)

    assert store.reserved_mib("kvm2") == 0 and ended not in store.active_ids()
    (entry,) = said(logs, "keeper.error")
    assert entry["duty"] == "recovery" and entry["key"] == job_key(BAD_ID)


def test_an_evacuation_whose_children_key_is_a_string_is_skipped_and_the_others_attended(
    store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime(store, config, monkeypatch)
    evacuations = EvacuationStore(store)
    good = evacuations.create(EvacuationSpec(host="kvm1"), "test")
    evacuations.request_abort(good, "stop")
    ts = datetime.now(UTC).isoformat()
    spec = EvacuationSpec(host="kvm1").model_dump_json()
    record = {"id": BAD_ID, "kind": EVACUATION_KIND, "state": "running", "spec": spec}
    store.r.hset(job_key(BAD_ID), mapping=record | {"created": ts, "updated": ts})
    store.r.set(children_key(BAD_ID), "x")
    store.r.sadd(ACTIVE_EVACUATIONS, BAD_ID)

    with capture_logs() as logs:
        evacuation_watch.watch(rt)

    assert evacuations.get(good).state is EvacuationState.CANCELLED
    (entry,) = said(logs, "record.unreadable")
    assert entry["evacuation_id"] == BAD_ID
    assert f"{children_key(BAD_ID)} is a string, not a hash" in entry["reason"]


# --- a shared key (finding 15) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "duty"),
    [(ACTIVE_JOBS, "recovery"), (ACTIVE_EVACUATIONS, "evacuations")],
)
def test_a_set_of_live_ids_that_is_not_a_set_is_said_and_not_taken_for_an_outage(
    store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch, key: str, duty: str
) -> None:
    rt = runtime(store, config, monkeypatch)
    store.r.set(key, "x")
    (run,) = [d for d in keeper.duties() if d.name == duty]
    duties = keeper.Keeper(rt, "test-keeper", [run])

    with capture_logs() as logs:
        duties.run_due()
        run.due = 0.0
        duties.run_due()  # said at each pass

    assert said(logs, "keeper.redis_unavailable") == [] and said(logs, "keeper.error") == []
    entries = said(logs, "keeper.key_unreadable")
    assert len(entries) == 2
    assert all(e["duty"] == duty and e["key"] == key for e in entries)
    assert f"{key} is a string, not a set" in entries[0]["reason"]
