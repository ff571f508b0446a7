"""Migration job records in Redis: create, read, move on (one transition script), and the
fields the phases write (facts, hand-off, result, phase records, claims, an abort request)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import redis
from pydantic import BaseModel

from config.addresses import shown
from jobs.keys import (
    ACTIVE_JOBS,
    JOBS_INDEX,
    WAITING,
    children_key,
    events_key,
    job_key,
    jobs_by_host_key,
    phases_key,
    transitions_key,
    waiting_by_origin_key,
)
from jobs.model import Job, PhaseRecord, Transition
from jobs.record import JobNotFound, merged_field
from jobs.record_marks import RecordMarks, now
from jobs.record_read import job_from, record_keys_read, shared_key_read
from jobs.replication import NO_WAIT
from jobs.request_signing import MIGRATION_KIND, RequestSigner, signed_record
from jobs.retention import Retention
from jobs.spec import MigrationSpec
from jobs.states import JOB_TABLE, JobState
from jobs.transition import Keys, Transitioner

if TYPE_CHECKING:
    from redis.client import Pipeline


def transition_keys(record_id: str, active: str) -> Keys:
    return Keys(job_key(record_id), transitions_key(record_id), active, WAITING)


class JobRecords(RecordMarks):
    def __init__(self, client: redis.Redis, retention: Retention) -> None:
        self.r = client
        self.retention = retention
        self._transitions = Transitioner(client, JOB_TABLE, retention)
        # Set by JobStore.from_url for a Sentinel set (jobs/replication.py).
        self.replica_wait = NO_WAIT

    def create(
        self,
        spec: MigrationSpec,
        *,
        host: str,
        parent: str | None = None,
        parent_limit: int | None = None,
        signer: RequestSigner | None = None,
        pipe: Pipeline | None = None,
    ) -> str:
        """Record a new queued job; `parent` is the evacuation it belongs to, if any, and
        `parent_limit` that evacuation's --max-parallel (a gate at admission). With a
        `signer`, the request is signed as `host` asked for it (jobs/request_signing.py).

        `host` is the job's `origin` (the producer, or the evacuation's worker: a producer's
        quota counts by it, jobs/quota.py). With a `pipe`, the writes are stacked there and
        not executed (filling a store with history in bulk, bench/history.py)."""
        ts = now()
        job_id = secrets.token_hex(6)
        first = Transition(state=JobState.QUEUED, at=ts, host=host)
        record = {
            "id": job_id,
            "spec": spec.model_dump_json(),
            "state": JobState.QUEUED.value,
            "created": ts.isoformat(),
            "updated": ts.isoformat(),
            "origin": host,
            **signed_record(
                signer,
                kind=MIGRATION_KIND,
                job_id=job_id,
                spec=spec,
                parent=parent,
                parent_limit=parent_limit,
                origin=host,
                at=ts,
            ),
        }
        if parent is not None:
            record["parent"] = parent
        if parent_limit is not None:
            record["parent_limit"] = str(parent_limit)
        p = pipe if pipe is not None else self.r.pipeline(transaction=True)
        p.hset(job_key(job_id), mapping=record)
        if parent is not None:  # in the same step: a crash cannot leave an orphan child
            p.hset(children_key(parent), spec.domain, job_id)
            self.retention.queue_adopt(p, parent, children_key(parent))
        p.rpush(transitions_key(job_id), first.model_dump_json())
        p.zadd(JOBS_INDEX, {job_id: ts.timestamp()})
        for host_index in {jobs_by_host_key(spec.src), jobs_by_host_key(spec.dst)}:
            p.zadd(host_index, {job_id: ts.timestamp()})
        p.sadd(ACTIVE_JOBS, job_id)
        if pipe is None:
            with p:
                p.execute()
        return job_id

    def discard(self, job_id: str) -> None:
        """Remove a job that was never queued (its submission was refused)."""
        parent, raw_spec, origin = cast(
            list[str | None], self.r.hmget(job_key(job_id), ["parent", "spec", "origin"])
        )
        spec = MigrationSpec.model_validate_json(raw_spec) if raw_spec else None
        with self.r.pipeline(transaction=True) as p:
            if parent and spec:
                p.hdel(children_key(parent), spec.domain)
            p.delete(job_key(job_id), transitions_key(job_id), events_key(job_id))
            p.zrem(JOBS_INDEX, job_id)
            for host in (spec.src, spec.dst) if spec else ():
                p.zrem(jobs_by_host_key(host), job_id)
            if origin:
                p.srem(waiting_by_origin_key(origin), job_id)
            p.srem(ACTIVE_JOBS, job_id)
            p.zrem(WAITING, job_id)
            p.execute()

    def get(self, job_id: str) -> Job:
        """The job; JobNotFound for none (or an evacuation), MalformedRecord for a record
        whose facts, hand-off or result are not what drover writes, or one of whose keys
        holds another type than drover writes there."""
        keys = {job_key(job_id): "hash", phases_key(job_id): "hash"}
        keys[transitions_key(job_id)] = "list"
        with (
            record_keys_read(self.r, f"job {job_id}", keys),
            self.r.pipeline(transaction=True) as p,
        ):
            p.hgetall(job_key(job_id))
            p.hgetall(phases_key(job_id))
            p.lrange(transitions_key(job_id), 0, -1)
            raw, phases, transitions = p.execute()
        if not raw:
            raise JobNotFound(f"no job {shown(job_id)}")
        if raw.get("kind", MIGRATION_KIND) != MIGRATION_KIND:
            raise JobNotFound(f"{shown(job_id)} is an {shown(raw['kind'])}, not a migration job")
        return job_from(job_id, raw, phases, transitions)

    def state(self, job_id: str) -> JobState:
        value = cast(str | None, self.r.hget(job_key(job_id), "state"))
        if value is None:
            raise JobNotFound(f"no job {shown(job_id)}")
        return JobState(value)

    def transition(
        self,
        job_id: str,
        target: JobState,
        *,
        host: str,
        reason: str | None = None,
        only_from: JobState | None = None,
    ) -> tuple[bool, JobState | None]:
        """Move the job to `target` if its current state allows it; (moved, previous state).

        A job already in `target` is not moved again: (False, target) tells the caller so
        (a phase run again by recovery re-enters the state it had reached). `only_from`
        narrows the allowed sources to the state the caller decided on. Ending the job gives
        back its slots, reservations and active mark in the same step (jobs/transition.py).
        """
        only = only_from.value if only_from is not None else None
        return self._transition(job_id, target, host, reason=reason, only_from=only)

    def end_phase_entering(
        self, job_id: str, phase: str, started: PhaseRecord | None, target: JobState, *, host: str
    ) -> tuple[bool, JobState | None]:
        """A phase's end and the state it leads to, in one MULTI (`transition`'s outcome): a
        worker killed, or Redis gone, between two writes would leave a phase ended and its
        state never entered, and a last phase's job live for ever."""
        ended = self._phase_end(job_id, phase, None, started)
        writes = None if ended is None else lambda p: self._queue_phase_end(p, ended)
        return self._transition(job_id, target, host, with_writes=writes)

    def _transition(
        self,
        job_id: str,
        target: JobState,
        host: str,
        *,
        reason: str | None = None,
        only_from: str | None = None,
        with_writes: Callable[[Pipeline], None] | None = None,
    ) -> tuple[bool, JobState | None]:
        ts = now()
        entry = Transition(state=target, at=ts, host=host, reason=reason).model_dump_json()
        out = self._transitions.run(
            transition_keys(job_id, ACTIVE_JOBS),
            job_id,
            target.value,
            ts.isoformat(),
            entry=entry,
            reason=reason,
            only_from=only_from,
            with_writes=with_writes,
        )
        if out.moved:
            self.replicated()
        return out.moved, JobState(out.previous) if out.previous else None

    def queue_transition(self, pipe: Pipeline, job_id: str, target: JobState, host: str) -> None:
        """Stack a transition on `pipe`, unread (filling a store with history in bulk)."""
        ts = now()
        entry = Transition(state=target, at=ts, host=host).model_dump_json()
        keys = transition_keys(job_id, ACTIVE_JOBS)
        self._transitions.queue(pipe, keys, job_id, target.value, ts.isoformat(), entry=entry)

    def hosts_of(self, job_id: str) -> tuple[str, ...]:
        """The job's source and destination (nothing for a job gone meanwhile)."""
        raw = cast(str | None, self.r.hget(job_key(job_id), "spec"))
        if raw is None:
            return ()
        spec = MigrationSpec.model_validate_json(raw)
        return (spec.src, spec.dst)

    def active_ids(self) -> list[str]:
        """The live migrations; KeyUnreadable when the set is not a set (written so by hand)."""
        with shared_key_read(self.r, ACTIVE_JOBS, "set"):
            return sorted(cast(set[str], self.r.smembers(ACTIVE_JOBS)))

    def field(self, job_id: str, name: str) -> str | None:
        return cast(str | None, self.r.hget(job_key(job_id), name))

    def update(self, job_id: str, **fields: BaseModel | dict[str, Any]) -> None:
        """Merge into the record's `facts`, `handoff` or `result` (jobs/record.py); a merge
        that would not read back as its model is refused (MalformedRecord), nothing written."""
        key = job_key(job_id)
        current = cast(list[str | None], self.r.hmget(key, list(fields)))
        merged = {
            name: merged_field(job_id, name, old, value)
            for (name, value), old in zip(fields.items(), current, strict=True)
        }
        self.r.hset(key, mapping=merged)

    def phase_started(self, job_id: str, phase: str, host: str) -> PhaseRecord:
        """Record the start; whatever the job was said to wait for is over. The record is
        returned for `phase_ended`, which then need not read it back."""
        rec = PhaseRecord(phase=phase, host=host, started=now())
        with self.r.pipeline(transaction=True) as p:
            p.hset(phases_key(job_id), phase, rec.model_dump_json())
            p.hdel(job_key(job_id), "waiting_for")
            self.retention.queue_adopt(p, job_id, phases_key(job_id))
            p.execute()
        return rec

    def set_waiting_for(self, job_id: str, reason: str) -> None:
        """Why an admitted job's next step has not started (shown until it starts)."""
        self.r.hset(job_key(job_id), "waiting_for", reason)

    def phase_ended(
        self,
        job_id: str,
        phase: str,
        error: str | None = None,
        *,
        started: PhaseRecord | None = None,
    ) -> None:
        """Record the end: of the record `phase_started` returned, or of the one read back."""
        ended = self._phase_end(job_id, phase, error, started)
        if ended is None:
            return
        with self.r.pipeline(transaction=True) as p:
            self._queue_phase_end(p, ended)
            p.execute()

    def _phase_end(
        self, job_id: str, phase: str, error: str | None, started: PhaseRecord | None
    ) -> tuple[str, PhaseRecord] | None:
        """(job id, its phase record ended now); None when the phase has no record."""
        if started is None:
            raw = cast(str | None, self.r.hget(phases_key(job_id), phase))
            if raw is None:
                return None
            started = PhaseRecord.model_validate_json(raw)
        return job_id, started.model_copy(update={"ended": now(), "error": error})

    def _queue_phase_end(self, p: Pipeline, ended: tuple[str, PhaseRecord]) -> None:
        job_id, rec = ended
        p.hset(phases_key(job_id), rec.phase, rec.model_dump_json())
        self.retention.queue_adopt(p, job_id, phases_key(job_id))

    def kind(self, job_id: str) -> str:
        """ "migration" or "evacuation"; JobNotFound for an unknown id."""
        raw = cast(list[str | None], self.r.hmget(job_key(job_id), ["id", "kind"]))
        if raw[0] is None:
            raise JobNotFound(f"no job {shown(job_id)}")
        return raw[1] or MIGRATION_KIND
