"""Jobs, reservations and event streams in Redis, shared by producers and workers.

State changes go through one Lua script, a compare-and-set: a transition happens only from a
state allowed to precede it, and the state, its timestamp and the history entry are written
together. Two workers (or a redelivered message) can therefore never both move a job on.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import redis

from jobs.model import Job, PhaseRecord, Transition
from jobs.spec import MigrationSpec
from jobs.states import TERMINAL, JobState, allowed_sources

KEY_PREFIX = "drover"
JOBS_INDEX = f"{KEY_PREFIX}:jobs"
EVENT_FIELD = "data"
EVENT_READ_BATCH = 500

# KEYS[1] job hash, KEYS[2] transitions list; ARGV[1] target state, ARGV[2] timestamp,
# ARGV[3] transition JSON, ARGV[4] reason ("" for none), ARGV[5..] allowed source states.
_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
for i = 5, #ARGV do
  if cur == ARGV[i] then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated', ARGV[2])
    if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[4]) end
    redis.call('RPUSH', KEYS[2], ARGV[3])
    return {1, cur}
  end
end
return {0, cur}
"""


def now() -> datetime:
    return datetime.now(UTC)


def job_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{job_key(job_id)}:events"


def reservations_key(host: str) -> str:
    return f"{KEY_PREFIX}:host:{host}:reservations"


def _in_run_order(raw: dict[str, str]) -> dict[str, PhaseRecord]:
    records = [PhaseRecord.model_validate_json(v) for v in raw.values()]
    return {r.phase: r for r in sorted(records, key=lambda r: r.started)}


class JobNotFound(LookupError):
    pass


class JobStore:
    def __init__(self, client: redis.Redis, *, event_maxlen: int = 10_000) -> None:
        self.r = client
        self.event_maxlen = event_maxlen
        self._transition = client.register_script(_TRANSITION_LUA)

    @classmethod
    def from_url(cls, url: str, *, event_maxlen: int = 10_000) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), event_maxlen=event_maxlen)

    # --- jobs -------------------------------------------------------------------------------

    def create(self, spec: MigrationSpec, *, host: str) -> str:
        ts = now()
        job_id = secrets.token_hex(6)
        first = Transition(state=JobState.QUEUED, at=ts, host=host)
        with self.r.pipeline(transaction=True) as p:
            p.hset(
                job_key(job_id),
                mapping={
                    "id": job_id,
                    "spec": spec.model_dump_json(),
                    "state": JobState.QUEUED.value,
                    "created": ts.isoformat(),
                    "updated": ts.isoformat(),
                },
            )
            p.rpush(f"{job_key(job_id)}:transitions", first.model_dump_json())
            p.zadd(JOBS_INDEX, {job_id: ts.timestamp()})
            p.execute()
        return job_id

    def get(self, job_id: str) -> Job:
        with self.r.pipeline(transaction=True) as p:
            p.hgetall(job_key(job_id))
            p.hgetall(f"{job_key(job_id)}:phases")
            p.lrange(f"{job_key(job_id)}:transitions", 0, -1)
            raw, phases, transitions = p.execute()
        if not raw:
            raise JobNotFound(f"no job {job_id!r}")
        return Job(
            id=raw["id"],
            spec=MigrationSpec.model_validate_json(raw["spec"]),
            state=JobState(raw["state"]),
            created=datetime.fromisoformat(raw["created"]),
            updated=datetime.fromisoformat(raw["updated"]),
            reason=raw.get("reason"),
            facts=json.loads(raw.get("facts", "{}")),
            handoff=json.loads(raw.get("handoff", "{}")),
            result=json.loads(raw.get("result", "{}")),
            phases=_in_run_order(phases),
            transitions=[Transition.model_validate_json(t) for t in transitions],
        )

    def state(self, job_id: str) -> JobState:
        value = cast(str | None, self.r.hget(job_key(job_id), "state"))
        if value is None:
            raise JobNotFound(f"no job {job_id!r}")
        return JobState(value)

    def transition(
        self, job_id: str, target: JobState, *, host: str, reason: str | None = None
    ) -> tuple[bool, JobState | None]:
        """Move the job to `target` if its current state allows it; (moved, previous state)."""
        ts = now()
        entry = Transition(state=target, at=ts, host=host, reason=reason).model_dump_json()
        sources = sorted(s.value for s in allowed_sources(target))
        moved, previous = self._transition(
            keys=[job_key(job_id), f"{job_key(job_id)}:transitions"],
            args=[target.value, ts.isoformat(), entry, reason or "", *sources],
        )
        return bool(moved), JobState(previous) if previous else None

    def update(self, job_id: str, **fields: dict[str, Any]) -> None:
        """Merge JSON fields (facts, handoff, result) into the job record."""
        key = job_key(job_id)
        current = cast(list[str | None], self.r.hmget(key, list(fields)))
        merged = {
            name: json.dumps({**json.loads(old or "{}"), **value})
            for (name, value), old in zip(fields.items(), current, strict=True)
        }
        self.r.hset(key, mapping=merged)

    def phase_started(self, job_id: str, phase: str, host: str) -> None:
        rec = PhaseRecord(phase=phase, host=host, started=now())
        self.r.hset(f"{job_key(job_id)}:phases", phase, rec.model_dump_json())

    def phase_ended(self, job_id: str, phase: str, error: str | None = None) -> None:
        key = f"{job_key(job_id)}:phases"
        raw = cast(str | None, self.r.hget(key, phase))
        if raw is None:
            return
        rec = PhaseRecord.model_validate_json(raw).model_copy(
            update={"ended": now(), "error": error}
        )
        self.r.hset(key, phase, rec.model_dump_json())

    def recent(self, limit: int = 50) -> list[Job]:
        ids = cast(list[str], self.r.zrevrange(JOBS_INDEX, 0, limit - 1))
        jobs = []
        for job_id in ids:
            try:
                jobs.append(self.get(job_id))
            except JobNotFound:
                continue
        return jobs

    # --- reservations -----------------------------------------------------------------------

    def reserve(self, host: str, job_id: str, memory_mib: int) -> None:
        self.r.hset(reservations_key(host), job_id, str(memory_mib))

    def release(self, host: str, job_id: str) -> None:
        self.r.hdel(reservations_key(host), job_id)

    def reserved_mib(self, host: str, *, excluding: str | None = None) -> int:
        held = cast(dict[str, str], self.r.hgetall(reservations_key(host)))
        return sum(int(v) for k, v in held.items() if k != excluding)

    # --- events -----------------------------------------------------------------------------

    def append_event(self, job_id: str, event: dict[str, Any]) -> str:
        return str(
            self.r.xadd(
                events_key(job_id),
                {EVENT_FIELD: json.dumps(event, default=str)},
                maxlen=self.event_maxlen,
                approximate=True,
            )
        )

    def read_events(
        self, job_id: str, after: str = "0-0", block_ms: int | None = None
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events after stream id `after`; with `block_ms`, wait up to that long for new ones."""
        if block_ms is None:
            start = f"({after}" if after != "0-0" else "-"
            rows = cast(
                list[tuple[str, dict[str, str]]], self.r.xrange(events_key(job_id), min=start)
            )
            return [(eid, json.loads(f[EVENT_FIELD])) for eid, f in rows]
        got = cast(
            list[tuple[str, list[tuple[str, dict[str, str]]]]],
            self.r.xread({events_key(job_id): after}, block=block_ms, count=EVENT_READ_BATCH),
        )
        return [(eid, json.loads(f[EVENT_FIELD])) for _, rows in got for eid, f in rows]

    def follow_events(self, job_id: str, *, block_ms: int = 1000) -> Iterator[dict[str, Any]]:
        """Every event of the job, old then new, until the job is terminal and drained."""
        last = "0-0"
        for eid, ev in self.read_events(job_id):
            last = eid
            yield ev
        while True:
            batch = self.read_events(job_id, after=last, block_ms=block_ms)
            for eid, ev in batch:
                last = eid
                yield ev
            if not batch and self.state(job_id) in TERMINAL:
                # One last non-blocking read: the terminal event may land just after the state.
                for eid, ev in self.read_events(job_id, after=last):
                    last = eid
                    yield ev
                return
