"""Finished jobs in bulk, for the control-plane bench (bench/scale.py): N historical
migrations written through drover's own store code, and what each costs Redis in memory.

Each job is what a plain successful migration leaves behind: its record (created by
`JobStore.create`, with a result like perform's), its five state transitions through the one
transition script (the last one ends it, so the retention script gives every key its time to
live and files it under `succeeded`), its five phase records and claims, and an event stream
of a typical size (the queued, admitted and state events, each phase's start, the migration's
start, progress once a second and completion). Everything for `batch` jobs goes in one
pipeline, so 100,000 jobs take a minute or two, not an afternoon.

    from bench.history import fill_history, memory_per_job
    store = JobStore.from_url(url, retention_s=...)   # the store every other part uses
    fill_history(store, 100_000, hosts=[f"h{i:03d}" for i in range(200)])
    bytes_per_job = memory_per_job(store, 2_000, hosts=...)   # used_memory delta / N
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from jobs.keys import EVENT_FIELD, claims_key, events_key, job_key, phases_key
from jobs.model import PhaseRecord, migration_event
from jobs.phases import Phase
from jobs.record import Result
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore

ORIGIN = "bench-history"
# A ten-second migration reports its progress once a second (tunables.progress_interval).
PROGRESS_EVENTS = 10
STATES = (
    JobState.PREFLIGHT,
    JobState.PREPARED,
    JobState.MIGRATING,
    JobState.FINISHING,
    JobState.SUCCEEDED,
)
MIB = 1024 * 1024
# KEYS[1] a job's stream; ARGV[1] the entry's field, ARGV[2..] the events' JSON, in order.
_APPEND_ALL_LUA = """
for i = 2, #ARGV do redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[i]) end
return #ARGV - 1
"""


def _progress(n: int) -> dict[str, Any]:
    total = 2048 * MIB
    return {
        "stage": "precopy",
        "data_total": total,
        "data_processed": min(total, (n + 1) * 200 * MIB),
        "data_remaining": max(0, total - (n + 1) * 200 * MIB),
        "memory_bandwidth": 200 * MIB,
        "memory_dirty_rate": 1200,
        "memory_iteration": 1 + n // 8,
    }


def _events(job_id: str, spec: MigrationSpec, progress: int) -> list[dict[str, Any]]:
    def ev(name: str, host: str, **fields: Any) -> dict[str, Any]:
        return migration_event(job_id, spec, name, host, **fields)

    events = [
        ev("job.queued", ORIGIN, state="queued", spec=spec.model_dump(mode="json")),
        ev("job.admitted", "admission"),
    ]
    for phase, state in zip(Phase, STATES, strict=True):
        host = spec.dst if phase in (Phase.DESTINATION_PREPARE, Phase.FINISH) else spec.src
        events.append(ev("phase.started", host, phase=phase.value))
        events.append(ev("job.state", host, phase=phase.value, state=state.value))
    events.append(ev("migration.started", spec.src, phase=Phase.PERFORM.value))
    for n in range(progress):
        events.append(ev("migration.progress", spec.src, phase=Phase.PERFORM.value, **_progress(n)))
    events.append(
        ev(
            "migration.completed",
            spec.src,
            phase=Phase.PERFORM.value,
            downtime_ms=42,
            mode="precopy",
        )
    )
    return events


def _queue_job(
    store: JobStore,
    pipe: Any,
    n: int,
    hosts: Sequence[str],
    rng: random.Random,
    progress: int,
    append_all: Any,
) -> str:
    src, dst = rng.sample(list(hosts), 2)
    spec = MigrationSpec(domain=f"hist-{n:07d}", src=src, dst=dst, live=True)
    job_id = store.create(spec, host=ORIGIN, pipe=pipe)
    # Appended while the job lives, as the workers' are (no time to live to adopt yet), the
    # same entries as `append_event` writes, in one call per job to save round trips.
    events = [json.dumps(e, default=str) for e in _events(job_id, spec, progress)]
    append_all(keys=[events_key(job_id)], args=[EVENT_FIELD, *events], client=pipe)
    now = datetime.now(UTC)
    result = Result(migration_ms=10_000.0, downtime_ms=42, mode="precopy")
    pipe.hset(
        job_key(job_id), mapping={"admitted": now.isoformat(), "result": result.model_dump_json()}
    )
    for phase in Phase:
        host = dst if phase in (Phase.DESTINATION_PREPARE, Phase.FINISH) else src
        record = PhaseRecord(phase=phase.value, host=host, started=now, ended=now)
        pipe.hset(phases_key(job_id), phase.value, record.model_dump_json())
        pipe.hset(claims_key(job_id), phase.value, host)
    for state in STATES:
        store.queue_transition(pipe, job_id, state, host=src)
    return job_id


def fill_history(
    store: JobStore,
    n: int,
    *,
    hosts: Sequence[str],
    batch: int = 500,
    seed: int = 14,
    progress_events: int = PROGRESS_EVENTS,
) -> list[str]:
    """Write `n` finished (succeeded) migrations between random pairs of `hosts` (at least
    two), `batch` per pipeline, each with `progress_events` progress events in its stream;
    returns their ids, oldest first."""
    if len(hosts) < 2:
        raise ValueError("fill_history needs at least two hosts")
    rng = random.Random(seed)
    append_all = store.r.register_script(_APPEND_ALL_LUA)
    ids: list[str] = []
    for start in range(0, n, batch):
        with store.r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + batch)):
                ids.append(_queue_job(store, pipe, i, hosts, rng, progress_events, append_all))
            pipe.execute()
    return ids


def used_memory(store: JobStore) -> int:
    """Redis's `used_memory`, in bytes."""
    info = cast(dict[str, Any], store.r.info("memory"))
    return int(info["used_memory"])


def memory_per_job(store: JobStore, n: int, *, hosts: Sequence[str]) -> float:
    """Bytes of Redis memory per finished job: `used_memory` before and after writing `n`."""
    before = used_memory(store)
    fill_history(store, n, hosts=hosts)
    return (used_memory(store) - before) / n


def event_bytes(store: JobStore, job_id: str) -> int:
    """The JSON size of one job's events (to say what a 'typical' stream is)."""
    return sum(len(json.dumps(e, default=str)) for _, e in store.read_events(job_id))
