"""The marks a job's record carries besides its state: who claimed each phase (a phase runs
once per job), a pending abort, post-copy and redispatch times. Part of `JobRecords`
(jobs/records.py), apart to keep each module short."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast

import redis

from jobs.abort_request import abort_fields
from jobs.keys import (
    ABORT_FIELD,
    ABORT_SIGNED_FIELD,
    ACTIVE_JOBS,
    POSTCOPY_FIELD,
    claims_key,
    job_key,
    phases_key,
    redispatched_field,
    transitions_key,
)
from jobs.model import Transition
from jobs.prepared_receipt import PREPARED_FIELD
from jobs.record import MalformedRecord
from jobs.states import JobState

if TYPE_CHECKING:
    from jobs.replication import ReplicaWait
    from jobs.retention import Retention


def now() -> datetime:
    return datetime.now(UTC)


def when(raw: str | None) -> datetime | None:
    """A time drover wrote (ISO 8601, UTC); ValueError for anything else, a time without an
    offset included (compared with drover's own times, it would raise deep in a duty)."""
    if not raw:
        return None
    found = datetime.fromisoformat(raw)
    if found.tzinfo is None:
        raise ValueError(f"{raw[:40]!r} has no UTC offset")
    return found


# KEYS[1] record, KEYS[2] history, KEYS[3] active set; ARGV[1] the state the record must be
# in, ARGV[2] the state it goes back to, ARGV[3] time, ARGV[4] history entry, ARGV[5] reason,
# ARGV[6] record id. Returns 1 if it went back, 0 if the record is in another state now.
_REOPEN_LUA = """
local function is(key, want) return redis.call('TYPE', key)['ok'] == want end
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated', ARGV[3], 'reason', ARGV[5])
if is(KEYS[2], 'list') or is(KEYS[2], 'none') then redis.call('RPUSH', KEYS[2], ARGV[4]) end
if is(KEYS[3], 'set') or is(KEYS[3], 'none') then redis.call('SADD', KEYS[3], ARGV[6]) end
redis.call('PERSIST', KEYS[1])
return 1
"""

# KEYS[1] record; ARGV[1] the abort field, ARGV[2] the post-copy field, ARGV[3] time. Returns
# the abort's reason (nothing marked) or nil (marked).
_MARK_UNLESS_ABORTING_LUA = """
local asked = redis.call('HGET', KEYS[1], ARGV[1])
if asked then return asked end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return false
"""


class RecordMarks:
    r: redis.Redis
    retention: Retention
    replica_wait: ReplicaWait

    def replicated(self) -> bool:
        """Wait until a replica holds this store's writes so far (a Sentinel set only)."""
        return self.replica_wait(self.r)

    def field(self, job_id: str, name: str) -> str | None:
        raise NotImplementedError

    # --- what makes phases idempotent and jobs abortable -------------------------------------

    def claim_phase(self, job_id: str, phase: str, host: str) -> bool:
        """True for the first caller only: a phase runs once per job, however often it is sent."""
        with self.r.pipeline(transaction=True) as p:
            p.hsetnx(claims_key(job_id), phase, host)
            self.retention.queue_adopt(p, job_id, claims_key(job_id))
            claimed, _ = p.execute()
        if claimed:
            self.replicated()  # the claim and the message's pop before it, on a replica
        return bool(claimed)

    def reopen(
        self, job_id: str, ended: JobState, target: JobState, *, host: str, reason: str
    ) -> bool:
        """Take a record that says it `ended` back to the live `target`, if it still says so:
        only for an end that libvirt contradicts, which no drover step entered (the caller
        judges that from its own host: worker/contradicted_end.py). Nothing else of the end
        is undone; the job's own end, later, gives everything back again."""
        ts = now()
        entry = Transition(state=target, at=ts, host=host, reason=reason).model_dump_json()
        script = self.r.register_script(_REOPEN_LUA)
        keys = [job_key(job_id), transitions_key(job_id), ACTIVE_JOBS]
        args = [ended.value, target.value, ts.isoformat(), entry, reason, job_id]
        return bool(script(keys=keys, args=args))

    def mark_prepared(self, job_id: str, receipt: str) -> None:
        """The destination's signed receipt of its prepare (jobs/prepared_receipt.py)."""
        self.r.hset(job_key(job_id), PREPARED_FIELD, receipt)

    def claim_of(self, job_id: str, phase: str) -> str | None:
        """The host that claimed `phase` of the job (None: nobody has)."""
        return cast(str | None, self.r.hget(claims_key(job_id), phase))

    def unclaim_phase(self, job_id: str, phase: str) -> None:
        """Give a phase back before a retry (it stopped before changing anything)."""
        self.r.hdel(claims_key(job_id), phase)

    def give_back_phase(self, job_id: str, phase: str) -> None:
        """A phase that stopped before changing anything, to be tried again: its claim and
        its start record go, so that it reads as never started. Should the retry never come
        (its worker killed while it waited), recovery then sends the phase again; a record
        ended "retrying" would read as done, and the job would skip the phase or wait for
        ever."""
        with self.r.pipeline(transaction=True) as p:
            p.hdel(claims_key(job_id), phase)
            p.hdel(phases_key(job_id), phase)
            p.execute()

    def request_abort(self, job_id: str, reason: str, signed: str | None = None) -> None:
        """The abort flag, with the request as its asker signed it (jobs/abort_request.py)."""
        self.r.hset(job_key(job_id), mapping=abort_fields(reason, signed))

    def withdraw_abort(self, job_id: str) -> None:
        """Take back an abort request that cannot be carried out."""
        self.r.hdel(job_key(job_id), ABORT_FIELD, ABORT_SIGNED_FIELD)

    def abort_requested(self, job_id: str) -> str | None:
        return self.field(job_id, ABORT_FIELD)

    def abort_request(self, job_id: str) -> tuple[str | None, str | None]:
        """The abort flag's reason and its signed request, read together."""
        reason, signed = cast(
            list[str | None], self.r.hmget(job_key(job_id), [ABORT_FIELD, ABORT_SIGNED_FIELD])
        )
        return reason, signed

    def mark_postcopy(self, job_id: str) -> None:
        """Record that libvirt switched the job's migration to post-copy: from then on it
        cannot be aborted (the guest already runs on the destination), and `abort` says so."""
        self.r.hset(job_key(job_id), POSTCOPY_FIELD, now().isoformat())

    def mark_postcopy_unless_aborting(self, job_id: str) -> str | None:
        """Mark the job switching to post-copy unless an abort is requested, in one step; the
        abort's reason when one is (nothing marked). `abort` requests first and then reads
        this mark (jobs/abort.py): of an abort and a switch asked at the same moment, at
        least one side sees the other, so an accepted abort never turns into a move."""
        asked = self.r.eval(
            _MARK_UNLESS_ABORTING_LUA,
            1,
            job_key(job_id),
            ABORT_FIELD,
            POSTCOPY_FIELD,
            now().isoformat(),
        )
        return None if asked is None else str(asked)

    def unmark_postcopy(self, job_id: str) -> None:
        """Take back a post-copy mark made for a switch libvirt then refused."""
        self.r.hdel(job_key(job_id), POSTCOPY_FIELD)

    def mark_redispatched(self, job_id: str, phase: str) -> None:
        self.r.hset(job_key(job_id), redispatched_field(phase), now().isoformat())

    def redispatched_at(self, job_id: str, phase: str) -> datetime | None:
        field = redispatched_field(phase)
        try:
            return when(self.field(job_id, field))
        except ValueError as exc:
            raise MalformedRecord(
                f"job {job_id}: its record cannot be read: {field}: {exc}"
            ) from None
