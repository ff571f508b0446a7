"""Migration job records in Redis: create, read, move on (one transition script), and the
fields the phases write (facts, hand-off, result, phase records, claims, an abort request)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, cast

import redis
from pydantic import BaseModel

from config.policy_model import EffectivePolicy
from jobs.keys import (
    ACTIVE_JOBS,
    JOBS_INDEX,
    POSTCOPY_FIELD,
    WAITING,
    children_key,
    claims_key,
    events_key,
    job_key,
    phases_key,
    redispatched_field,
    transitions_key,
)
from jobs.model import Job, PhaseRecord, Transition
from jobs.record import Handoff, JobNotFound, Result, SourceFacts, merged_field, parse_field
from jobs.replication import NO_WAIT
from jobs.request_signing import MIGRATION_KIND, REQUEST_FIELD, RequestSigner, signed_record
from jobs.spec import MigrationSpec
from jobs.states import JOB_TABLE, JobState
from jobs.transition import Keys, Transitioner


def now() -> datetime:
    return datetime.now(UTC)


def _in_run_order(raw: dict[str, str]) -> dict[str, PhaseRecord]:
    records = [PhaseRecord.model_validate_json(v) for v in raw.values()]
    return {r.phase: r for r in sorted(records, key=lambda r: r.started)}


def _when(raw: str | None) -> datetime | None:
    return datetime.fromisoformat(raw) if raw else None


def transition_keys(record_id: str, active: str) -> Keys:
    return Keys(job_key(record_id), transitions_key(record_id), active, WAITING)


class JobRecords:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._transitions = Transitioner(client, JOB_TABLE)
        # Set by JobStore.from_url for a Sentinel set (jobs/replication.py).
        self.replica_wait = NO_WAIT

    def replicated(self) -> bool:
        """Wait until a replica holds this store's writes so far (a Sentinel set only)."""
        return self.replica_wait(self.r)

    def create(
        self,
        spec: MigrationSpec,
        *,
        host: str,
        parent: str | None = None,
        parent_limit: int | None = None,
        signer: RequestSigner | None = None,
    ) -> str:
        """Record a new queued job; `parent` is the evacuation it belongs to, if any, and
        `parent_limit` that evacuation's --max-parallel (a gate at admission). With a
        `signer`, the request is signed as `host` asked for it (jobs/request_signing.py)."""
        ts = now()
        job_id = secrets.token_hex(6)
        first = Transition(state=JobState.QUEUED, at=ts, host=host)
        record = {
            "id": job_id,
            "spec": spec.model_dump_json(),
            "state": JobState.QUEUED.value,
            "created": ts.isoformat(),
            "updated": ts.isoformat(),
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
        with self.r.pipeline(transaction=True) as p:
            p.hset(job_key(job_id), mapping=record)
            if parent is not None:  # in the same step: a crash cannot leave an orphan child
                p.hset(children_key(parent), spec.domain, job_id)
            p.rpush(transitions_key(job_id), first.model_dump_json())
            p.zadd(JOBS_INDEX, {job_id: ts.timestamp()})
            p.sadd(ACTIVE_JOBS, job_id)
            p.execute()
        return job_id

    def discard(self, job_id: str) -> None:
        """Remove a job that was never queued (its submission was refused)."""
        parent, raw_spec = cast(list[str | None], self.r.hmget(job_key(job_id), ["parent", "spec"]))
        with self.r.pipeline(transaction=True) as p:
            if parent and raw_spec:
                p.hdel(children_key(parent), MigrationSpec.model_validate_json(raw_spec).domain)
            p.delete(job_key(job_id), transitions_key(job_id), events_key(job_id))
            p.zrem(JOBS_INDEX, job_id)
            p.srem(ACTIVE_JOBS, job_id)
            p.zrem(WAITING, job_id)
            p.execute()

    def get(self, job_id: str) -> Job:
        """The job; JobNotFound for none (or an evacuation), MalformedRecord for a record
        whose facts, hand-off or result are not what drover writes."""
        with self.r.pipeline(transaction=True) as p:
            p.hgetall(job_key(job_id))
            p.hgetall(phases_key(job_id))
            p.lrange(transitions_key(job_id), 0, -1)
            raw, phases, transitions = p.execute()
        if not raw:
            raise JobNotFound(f"no job {job_id!r}")
        if raw.get("kind", MIGRATION_KIND) != MIGRATION_KIND:
            raise JobNotFound(f"{job_id} is an {raw['kind']}, not a migration job")
        stalled_from = raw.get("stalled_from")
        return Job(
            id=raw["id"],
            spec=MigrationSpec.model_validate_json(raw["spec"]),
            state=JobState(raw["state"]),
            created=datetime.fromisoformat(raw["created"]),
            updated=datetime.fromisoformat(raw["updated"]),
            reason=raw.get("reason"),
            stalled_from=JobState(stalled_from) if stalled_from else None,
            abort_requested=raw.get("abort_requested"),
            postcopy_since=_when(raw.get(POSTCOPY_FIELD)),
            admitted=_when(raw.get("admitted")),
            waiting_for=raw.get("waiting_for"),
            parent=raw.get("parent"),
            parent_limit=int(raw["parent_limit"]) if raw.get("parent_limit") else None,
            request=raw.get(REQUEST_FIELD),
            facts=parse_field(SourceFacts, job_id, "facts", raw.get("facts")),
            handoff=parse_field(Handoff, job_id, "handoff", raw.get("handoff")) or Handoff(),
            policy=parse_field(EffectivePolicy, job_id, "policy", raw.get("policy")),
            result=parse_field(Result, job_id, "result", raw.get("result")) or Result(),
            phases=_in_run_order(phases),
            transitions=[Transition.model_validate_json(t) for t in transitions],
        )

    def state(self, job_id: str) -> JobState:
        value = cast(str | None, self.r.hget(job_key(job_id), "state"))
        if value is None:
            raise JobNotFound(f"no job {job_id!r}")
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
        ts = now()
        entry = Transition(state=target, at=ts, host=host, reason=reason).model_dump_json()
        out = self._transitions.run(
            transition_keys(job_id, ACTIVE_JOBS),
            job_id,
            target.value,
            ts.isoformat(),
            entry=entry,
            reason=reason,
            only_from=only_from.value if only_from is not None else None,
        )
        if out.moved:
            self.replicated()
        return out.moved, JobState(out.previous) if out.previous else None

    def hosts_of(self, job_id: str) -> tuple[str, ...]:
        """The job's source and destination (nothing for a job gone meanwhile)."""
        raw = cast(str | None, self.r.hget(job_key(job_id), "spec"))
        if raw is None:
            return ()
        spec = MigrationSpec.model_validate_json(raw)
        return (spec.src, spec.dst)

    def active_ids(self) -> list[str]:
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

    def phase_started(self, job_id: str, phase: str, host: str) -> None:
        """Record the start; whatever the job was said to wait for is over."""
        rec = PhaseRecord(phase=phase, host=host, started=now())
        with self.r.pipeline(transaction=True) as p:
            p.hset(phases_key(job_id), phase, rec.model_dump_json())
            p.hdel(job_key(job_id), "waiting_for")
            p.execute()

    def set_waiting_for(self, job_id: str, reason: str) -> None:
        """Why an admitted job's next step has not started (shown until it starts)."""
        self.r.hset(job_key(job_id), "waiting_for", reason)

    def phase_ended(self, job_id: str, phase: str, error: str | None = None) -> None:
        key = phases_key(job_id)
        raw = cast(str | None, self.r.hget(key, phase))
        if raw is None:
            return
        rec = PhaseRecord.model_validate_json(raw).model_copy(
            update={"ended": now(), "error": error}
        )
        self.r.hset(key, phase, rec.model_dump_json())

    def recent_ids(self, limit: int = 50) -> list[str]:
        """Newest first: migrations and evacuations alike."""
        return cast(list[str], self.r.zrevrange(JOBS_INDEX, 0, limit - 1))

    def kind(self, job_id: str) -> str:
        """ "migration" or "evacuation"; JobNotFound for an unknown id."""
        raw = cast(list[str | None], self.r.hmget(job_key(job_id), ["id", "kind"]))
        if raw[0] is None:
            raise JobNotFound(f"no job {job_id!r}")
        return raw[1] or MIGRATION_KIND

    def recent(self, limit: int = 50) -> list[Job]:
        jobs = []
        for job_id in self.recent_ids(limit):
            try:
                jobs.append(self.get(job_id))
            except JobNotFound:
                continue
        return jobs

    # --- what makes phases idempotent and jobs abortable -------------------------------------

    def claim_phase(self, job_id: str, phase: str, host: str) -> bool:
        """True for the first caller only: a phase runs once per job, however often it is sent."""
        claimed = bool(self.r.hsetnx(claims_key(job_id), phase, host))
        if claimed:
            self.replicated()  # the claim and the message's pop before it, on a replica
        return claimed

    def unclaim_phase(self, job_id: str, phase: str) -> None:
        """Give a phase back before a retry (it stopped before changing anything)."""
        self.r.hdel(claims_key(job_id), phase)

    def request_abort(self, job_id: str, reason: str) -> None:
        self.r.hset(job_key(job_id), "abort_requested", reason)

    def withdraw_abort(self, job_id: str) -> None:
        """Take back an abort request that cannot be carried out."""
        self.r.hdel(job_key(job_id), "abort_requested")

    def abort_requested(self, job_id: str) -> str | None:
        return self.field(job_id, "abort_requested")

    def mark_postcopy(self, job_id: str) -> None:
        """Record that libvirt switched the job's migration to post-copy: from then on it
        cannot be aborted (the guest already runs on the destination), and `abort` says so."""
        self.r.hset(job_key(job_id), POSTCOPY_FIELD, now().isoformat())

    def mark_redispatched(self, job_id: str, phase: str) -> None:
        self.r.hset(job_key(job_id), redispatched_field(phase), now().isoformat())

    def redispatched_at(self, job_id: str, phase: str) -> datetime | None:
        return _when(self.field(job_id, redispatched_field(phase)))
