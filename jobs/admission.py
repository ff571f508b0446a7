"""Admission: a migration starts only when every concurrency limit it falls under has room.

A job falls under up to four gates: its source's outbound limit, its destination's inbound
limit (both from the registry), the cluster-wide limit, and its evacuation's `--max-parallel`.
A gate is a Redis set of the ids of the jobs holding a slot in it. One Lua script checks every
gate and takes a slot in all of them at once, or in none; the store's terminal transition
gives the slots back in the same atomic step that ends the job (jobs/transition.py). So a slot is
held for exactly as long as its job lives: through a worker crash and its recovery, and never
longer (a job that ended without giving a slot back is pruned by the next admission).

Jobs not yet admitted wait in one sorted set, oldest first. Whoever runs `admit_waiting`
(a producer after submitting, every worker on a short tick and whenever a job ends) admits
what fits now; a job blocked on one host never holds up a job between two other hosts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from jobs.keys import (
    CLUSTER_GATE,
    GATES_FIELD,
    WAITING,
    evacuation_gate,
    inbound_gate,
    job_key,
    outbound_gate,
)
from jobs.model import migration_event
from jobs.request_signing import (
    MIGRATION_KIND,
    REQUEST_FIELD,
    SECURITY_REASON,
    RequestRefused,
    RequestVerifier,
    check_record,
)
from jobs.spec import MigrationSpec
from jobs.states import TERMINAL, JobState
from jobs.store import JobStore, now

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["CLUSTER_GATE", "WAITING", "evacuation_gate", "inbound_gate", "outbound_gate"]

ADMITTED, REFUSED, GONE, ALREADY = 1, 0, -1, 2
ADMISSION_HOST = "admission"  # the `host` of the events and transitions admission writes
BAD_SPEC = "refused: the job record's spec is not valid"

# KEYS[1] waiting set, KEYS[2] job hash, KEYS[3..] gate sets; ARGV[1] job id, ARGV[2] time,
# ARGV[3] the queued state, ARGV[4] the job key prefix, ARGV[5] the gates field, ARGV[6] the
# number of terminal states n, ARGV[7..6+n] those states, ARGV[7+n..] the gates' limits in
# KEYS order. Returns {1} admitted, {0, gate} refused by gate, {-1, state} not waiting any
# more (ended, aborted), {2} admitted before.
_ADMIT_LUA = """
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= ARGV[3] or redis.call('HEXISTS', KEYS[2], 'abort_requested') == 1 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {-1, state or ''}
end
if redis.call('HEXISTS', KEYS[2], 'admitted') == 1 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {2, ''}
end
local n = tonumber(ARGV[6])
local ended = {}
for i = 7, 6 + n do ended[ARGV[i]] = true end
for i = 3, #KEYS do
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    local s = redis.call('HGET', ARGV[4] .. member, 'state')
    if (not s) or ended[s] then redis.call('SREM', KEYS[i], member) end
  end
  if redis.call('SCARD', KEYS[i]) >= tonumber(ARGV[4 + n + i]) then return {0, KEYS[i]} end
end
local gates = {}
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[1])
  gates[#gates + 1] = KEYS[i]
end
redis.call('HSET', KEYS[2], 'admitted', ARGV[2], ARGV[5], table.concat(gates, ' '))
redis.call('HDEL', KEYS[2], 'waiting_for')
redis.call('ZREM', KEYS[1], ARGV[1])
return {1, ''}
"""
_TERMINAL_NAMES = sorted(s.value for s in TERMINAL)


@dataclass(frozen=True)
class Gate:
    key: str
    limit: int
    label: str  # for people: "lab1 outbound (limit 2)"


def gates_for(
    spec: MigrationSpec, settings: Settings, parent_limit: int | None = None, parent: str = ""
) -> list[Gate]:
    """Every limit a migration falls under, read from the registry as it is now."""
    src, dst = settings.host(spec.src).limits, settings.host(spec.dst).limits
    cluster = settings.cluster.max_migrations
    gates = [
        Gate(outbound_gate(spec.src), src.max_outbound, f"{spec.src} outbound"),
        Gate(inbound_gate(spec.dst), dst.max_inbound, f"{spec.dst} inbound"),
        Gate(CLUSTER_GATE, cluster, "cluster-wide"),
    ]
    if parent and parent_limit is not None:
        gates.append(Gate(evacuation_gate(parent), parent_limit, f"evacuation {parent}"))
    return gates


Send = Callable[[str, MigrationSpec], None]


class Admission:
    """Admits waiting jobs; `send` starts an admitted job's chain (Celery stays outside)."""

    def __init__(self, store: JobStore, verifier: RequestVerifier | None = None) -> None:
        """With a `verifier` (signing on), a job starts only if a trusted key signed its
        request; anything else ends `failed` here and nothing is sent."""
        self.store = store
        self.verifier = verifier
        self._admit = store.r.register_script(_ADMIT_LUA)

    def wait(self, job_id: str, created: float) -> None:
        """Put a new job in line; it starts when `admit_waiting` finds room for it."""
        self.store.r.zadd(WAITING, {job_id: created})

    def waiting_ids(self) -> list[str]:
        return cast(list[str], self.store.r.zrange(WAITING, 0, -1))

    def admit_waiting(self, settings: Settings, send: Send) -> list[str]:
        """Admit, oldest first, every waiting job that fits now; return the ids admitted."""
        admitted = []
        for job_id in self.waiting_ids():
            if self._try(job_id, settings, send):
                admitted.append(job_id)
        return admitted

    def _try(self, job_id: str, settings: Settings, send: Send) -> bool:
        fields = cast(
            list[str | None],
            self.store.r.hmget(
                job_key(job_id),
                ["spec", "parent", "parent_limit", "waiting_for", REQUEST_FIELD],
            ),
        )
        raw_spec, parent, parent_limit, waiting_for, request = fields
        if raw_spec is None:
            self.store.r.zrem(WAITING, job_id)
            return False
        try:
            spec = MigrationSpec.model_validate_json(raw_spec)
        except ValueError:
            self.store.r.zrem(WAITING, job_id)  # not a job any producer could have written
            self.store.transition(job_id, JobState.FAILED, host=ADMISSION_HOST, reason=BAD_SPEC)
            return False
        try:
            check_record(
                self.verifier,
                request,
                job_id,
                kind=MIGRATION_KIND,
                spec=spec,
                parent=parent,
                parent_limit=int(parent_limit) if parent_limit else None,
                max_age_s=settings.tunables.request_max_age,
            )
        except RequestRefused as exc:
            reason = f"{SECURITY_REASON}: {exc}"
            event = migration_event(
                job_id, spec, "security.rejected", ADMISSION_HOST, reason=reason
            )
            self.store.append_event(job_id, event)
            self._end(job_id, spec, JobState.FAILED, reason)
            self.store.r.zrem(WAITING, job_id)
            return False
        try:
            gates = gates_for(spec, settings, int(parent_limit or 0) or None, parent or "")
        except Exception as exc:  # a host removed from the registry while the job waited
            self._end(job_id, spec, JobState.FAILED, f"cannot admit: {exc}")
            return False
        result = cast(
            list[Any],
            self._admit(
                keys=[WAITING, job_key(job_id), *(g.key for g in gates)],
                args=[
                    job_id,
                    _now_iso(),
                    JobState.QUEUED.value,
                    job_key(""),
                    GATES_FIELD,
                    len(_TERMINAL_NAMES),
                    *_TERMINAL_NAMES,
                    *(g.limit for g in gates),
                ],
            ),
        )
        code = int(result[0])
        if code == ADMITTED:
            send(job_id, spec)
            return True
        if code == GONE and result[1] == JobState.QUEUED.value:
            # Its abort was cut short between the flag and the transition: finish it.
            self._end(job_id, spec, JobState.CANCELLED, "aborted before it started")
        if code == REFUSED:
            gate = next(g for g in gates if g.key == result[1])
            reason = f"waiting for a slot: {gate.label} limit {gate.limit} reached"
            if reason != waiting_for:  # tell followers once per reason, not once per pass
                self.store.r.hset(job_key(job_id), "waiting_for", reason)
                self.store.append_event(
                    job_id,
                    migration_event(job_id, spec, "job.waiting", ADMISSION_HOST, reason=reason),
                )
        return False

    def _end(self, job_id: str, spec: MigrationSpec, final: JobState, reason: str) -> None:
        moved, _ = self.store.transition(
            job_id, final, host=ADMISSION_HOST, reason=reason, only_from=JobState.QUEUED
        )
        if moved:
            event = migration_event(
                job_id, spec, "job.state", ADMISSION_HOST, state=final.value, reason=reason
            )
            self.store.append_event(job_id, event)

    def holders(self, gate: str) -> set[str]:
        return cast(set[str], self.store.r.smembers(gate))


def _now_iso() -> str:
    return now().isoformat()
