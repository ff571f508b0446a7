"""A time without an offset written into a job record by hand makes that record unreadable
(MalformedRecord, skipped by every duty), never a TypeError deep in a duty that stops it for
the jobs after it; and a job's end is handled in full whatever its record's times say.
Against the real test Redis."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from jobs.keys import ACTIVE_JOBS, job_key, phases_key, redispatched_field, transitions_key
from jobs.model import Job, Transition
from jobs.phases import Phase
from jobs.record import MalformedRecord
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore, reservations_key
from worker import job_end, recovery
from worker.runtime import Runtime

BAD_ID = "000000000000"  # sorts before any id drover makes: swept first
NAIVE = "2026-01-01T00:00:00"
SPEC = MigrationSpec(domain="web01", src="kvm1", dst="kvm2")


def runtime(store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    return Runtime(host="kvm1", store=store, libvirt=cast(Any, None), ledger=cast(Any, None))


def job_states(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "job.state"]


def test_the_sweep_skips_a_record_with_naive_times_and_attends_the_jobs_after_it(
    store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's record: created/updated without an offset, admitted with one, on lab1."""
    rt = runtime(store, config, monkeypatch)
    ended = store.create(SPEC, host="test")
    store.transition(ended, JobState.FAILED, host="test", reason="x")
    store.r.sadd(ACTIVE_JOBS, ended)  # a crash between its end and the cleanup
    store.r.hset(reservations_key("kvm2"), ended, "64")
    aware = datetime.now(UTC).isoformat()
    bad = {"id": BAD_ID, "spec": SPEC.model_dump_json(), "state": "queued"}
    store.r.hset(job_key(BAD_ID), mapping=bad | {"created": NAIVE, "updated": NAIVE})
    store.r.hset(job_key(BAD_ID), "admitted", aware)
    store.r.sadd(ACTIVE_JOBS, BAD_ID)

    recovery.sweep(rt)  # raised TypeError (naive vs aware) before reaching the ended job

    assert store.reserved_mib("kvm2") == 0 and store.active_ids() == [BAD_ID]
    with pytest.raises(MalformedRecord, match=f"job {BAD_ID}: its record cannot be read"):
        store.get(BAD_ID)


def _admitted(store: JobStore, job_id: str, raw: str) -> None:
    store.r.hset(job_key(job_id), "admitted", raw)


def _postcopy(store: JobStore, job_id: str, raw: str) -> None:
    store.r.hset(job_key(job_id), "postcopy_since", raw)


def _created(store: JobStore, job_id: str, raw: str) -> None:
    store.r.hset(job_key(job_id), "created", raw)


def _phase(store: JobStore, job_id: str, raw: str) -> None:
    record = {"phase": Phase.SOURCE_PREFLIGHT.value, "host": "kvm1", "started": raw}
    store.r.hset(phases_key(job_id), Phase.SOURCE_PREFLIGHT.value, json.dumps(record))


def _transition(store: JobStore, job_id: str, raw: str) -> None:
    entry = {"state": JobState.QUEUED.value, "at": raw, "host": "kvm1"}
    store.r.rpush(transitions_key(job_id), json.dumps(entry))


@pytest.mark.parametrize("write", [_admitted, _postcopy, _created, _phase, _transition])
def test_every_time_read_from_a_job_record_must_carry_its_offset(
    store: JobStore, write: Any
) -> None:
    job_id = store.create(SPEC, host="test")
    write(store, job_id, NAIVE)
    with pytest.raises(MalformedRecord, match=f"job {job_id}: its record cannot be read"):
        store.get(job_id)


def test_a_time_with_any_offset_still_reads() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC).astimezone()
    assert Transition(state=JobState.QUEUED, at=at, host="kvm1").at == at


def test_a_job_ending_with_times_it_cannot_measure_still_ends_in_full(
    store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ended_fields` runs after the transition: had it raised, the job would be recorded
    failed with no terminal `job.state`, no rollback and no job-end listeners."""
    rt = runtime(store, config, monkeypatch)
    ended: list[str] = []
    listener = job_end.on_job_end(lambda _rt, job: ended.append(job.id))
    try:
        for admitted in (datetime(2026, 12, 3), datetime.now(UTC) + timedelta(days=1)):
            job_id = store.create(SPEC, host="test")
            job = store.get(job_id).model_copy(update={"admitted": admitted})
            with capture_logs() as logs:
                job_end.fail_job(rt, job, Phase.SOURCE_PREFLIGHT, "it failed")
            assert store.get(job_id).state is JobState.FAILED
            [said] = job_states(logs)
            assert said["state"] == JobState.FAILED.value and "duration_s" not in said
            assert ended[-1] == job_id
    finally:
        job_end._job_end_listeners.remove(listener)


def test_a_measurable_end_still_says_its_duration() -> None:
    at = datetime.now(UTC) - timedelta(seconds=30)
    job = Job(id="0123456789ab", spec=SPEC, state=JobState.FAILED, created=at, updated=at)
    assert 29 < job_end.ended_fields(job)["duration_s"] < 60


@pytest.mark.parametrize("raw", [NAIVE, "yesterday"])
def test_a_redispatch_mark_drover_did_not_write_is_an_unreadable_record(
    store: JobStore, raw: str
) -> None:
    """The phase's redispatch mark (a field recovery reads beside the record) without an
    offset used to come back naive, and recovery's `max(aware, naive)` raised TypeError for
    that job at every sweep; one that is no time raised ValueError. Both are MalformedRecord:
    the sweep says so for that job (record.unreadable) and goes on."""
    job_id = store.create(SPEC, host="test")
    store.r.hset(job_key(job_id), redispatched_field(Phase.PERFORM.value), raw)
    with pytest.raises(MalformedRecord):
        store.redispatched_at(job_id, Phase.PERFORM.value)
