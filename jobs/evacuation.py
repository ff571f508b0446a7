"""An evacuation: empty one host onto others, as a job of its own with child migrations.

    queued -> planning -> running -> drained | partial | cancelled
                       -> planned   (a dry run: the plan, nothing queued)
    any live state     -> failed    (the plan itself could not be made)

The source host's worker plans (it alone reads the host's domains), queues one child
migration per placed domain, and watches the children (worker/evacuation.py). `drained` is
said only after libvirt on the source confirms that no domain the evacuation had to move is
left there; anything else ends `partial`, each domain left behind listed with its reason.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.model import elapsed_s
from jobs.request_signing import REQUEST_FIELD, RequestSigner, signed_record
from jobs.spec import MAX_BANDWIDTH_MIB, MAX_COMPLETION_TIMEOUT_S, HostRef, TimeoutAction
from jobs.store import JOBS_INDEX, JobNotFound, JobStore, children_key, job_key, now

M = TypeVar("M", bound=BaseModel)
EVACUATION_KIND = "evacuation"
ACTIVE_EVACUATIONS = "drover:evacuations:active"
MAX_PARALLEL = 64


class EvacuationState(StrEnum):
    QUEUED = "queued"
    PLANNING = "planning"
    RUNNING = "running"
    PLANNED = "planned"
    DRAINED = "drained"
    PARTIAL = "partial"
    CANCELLED = "cancelled"
    FAILED = "failed"


EVACUATION_TERMINAL = frozenset(
    {
        EvacuationState.PLANNED,
        EvacuationState.DRAINED,
        EvacuationState.PARTIAL,
        EvacuationState.CANCELLED,
        EvacuationState.FAILED,
    }
)
_LIVE = frozenset(EvacuationState) - EVACUATION_TERMINAL
_FROM: dict[EvacuationState, frozenset[EvacuationState]] = {
    EvacuationState.PLANNING: frozenset({EvacuationState.QUEUED}),
    EvacuationState.RUNNING: frozenset({EvacuationState.PLANNING}),
    EvacuationState.PLANNED: frozenset({EvacuationState.PLANNING}),
    EvacuationState.DRAINED: frozenset({EvacuationState.RUNNING}),
    EvacuationState.PARTIAL: frozenset({EvacuationState.RUNNING}),
    EvacuationState.CANCELLED: _LIVE,
    EvacuationState.FAILED: _LIVE,
}


class EvacuationSpec(BaseModel):
    """What the operator asked for. Child migrations are live and peer-to-peer; a persistent
    domain's definition moves with it (--persistent --undefine-source), so nothing of it is
    left on the host going into maintenance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: HostRef
    to: list[HostRef] = []
    max_parallel: int | None = Field(default=None, ge=1, le=MAX_PARALLEL)
    include_inactive: bool = False
    dry_run: bool = False
    # Applied to every child migration.
    tunnelled: bool = False
    auto_converge: bool = False
    bandwidth_mib: int | None = Field(default=None, ge=1, le=MAX_BANDWIDTH_MIB)
    # A guest that never converges would hold the drain until the fleet's hard limit.
    completion_timeout_s: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TIMEOUT_S)
    timeout_action: TimeoutAction | None = None

    @field_validator("to")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        seen = [h for i, h in enumerate(value) if h in value[:i]]
        if seen:
            raise ValueError(f"--to names {seen[0]} twice")
        return value

    @model_validator(mode="after")
    def _not_itself(self) -> EvacuationSpec:
        if self.host in self.to:
            raise ValueError(f"--to includes {self.host}, the host being evacuated")
        if self.timeout_action is not None and self.completion_timeout_s is None:
            raise ValueError("--timeout-action needs --completion-timeout")
        if self.timeout_action is TimeoutAction.POSTCOPY:
            raise ValueError("--timeout-action postcopy: evacuations do not use post-copy")
        return self


class Placement(BaseModel):
    """One domain of the plan: where it goes, or why it cannot go anywhere."""

    domain: str
    uuid: str
    memory_mib: int
    active: bool
    persistent: bool
    group: str | None = None
    destination: str | None = None
    estimate_s: float | None = None
    reason: str | None = None  # why it was not placed


class DomainOutcome(BaseModel):
    """Where a domain of the plan is at the end, as libvirt on both hosts reports it."""

    domain: str
    job_id: str | None
    job_state: str | None
    on_source: bool  # still defined or running on the evacuated host
    running_on: str | None  # its destination, if libvirt there shows it as planned
    moved: bool = False  # the child succeeded, it is on its destination and gone from here
    reason: str | None = None  # why it did not move


class Evacuation(BaseModel):
    id: str
    spec: EvacuationSpec
    state: EvacuationState
    origin: str
    created: datetime
    updated: datetime
    reason: str | None = None
    abort_requested: str | None = None
    plan: list[Placement] | None = None
    children: dict[str, str] = {}  # domain -> child job id
    outcome: list[DomainOutcome] = []
    left_on_host: list[str] = []  # domains still on the host that the evacuation did not cover
    request: str | None = None  # the signed request (jobs/request_signing.py)

    @property
    def terminal(self) -> bool:
        return self.state in EVACUATION_TERMINAL

    @property
    def duration_s(self) -> float:
        return elapsed_s(self.created, self.updated, self.terminal)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": EVACUATION_KIND,
            "state": self.state.value,
            "domain": f"{len(self.plan or [])} domains",
            "src": self.spec.host,
            "dst": ",".join(self.spec.to) or "any",
            "created": self.created.isoformat(),
            "duration_s": round(self.duration_s, 3),
            "reason": self.reason,
        }


# KEYS[1] record, KEYS[2] active set; ARGV[1] target, ARGV[2] time, ARGV[3] reason, ARGV[4] id,
# ARGV[5] "1" if terminal, ARGV[6..] allowed sources. Returns {moved, previous}.
_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
if cur == ARGV[1] then return {2, cur} end
for i = 6, #ARGV do
  if cur == ARGV[i] then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated', ARGV[2])
    if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[3]) end
    if ARGV[5] == '1' then redis.call('SREM', KEYS[2], ARGV[4]) end
    return {1, cur}
  end
end
return {0, cur}
"""


class EvacuationStore:
    """Evacuation records, in the same id space, index and event streams as migration jobs."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.r = store.r
        self._transition = self.r.register_script(_TRANSITION_LUA)

    def create(self, spec: EvacuationSpec, origin: str, signer: RequestSigner | None = None) -> str:
        """Record a queued evacuation; with a `signer`, its request is signed as `origin`'s."""
        ts = now()
        evacuation_id = secrets.token_hex(6)
        signed = signed_record(
            signer,
            kind=EVACUATION_KIND,
            job_id=evacuation_id,
            spec=spec,
            origin=origin,
            at=ts,
        )
        with self.r.pipeline(transaction=True) as p:
            p.hset(
                job_key(evacuation_id),
                mapping={
                    "id": evacuation_id,
                    "kind": EVACUATION_KIND,
                    "spec": spec.model_dump_json(),
                    "state": EvacuationState.QUEUED.value,
                    "origin": origin,
                    "created": ts.isoformat(),
                    "updated": ts.isoformat(),
                    **signed,
                },
            )
            p.zadd(JOBS_INDEX, {evacuation_id: ts.timestamp()})
            p.sadd(ACTIVE_EVACUATIONS, evacuation_id)
            p.execute()
        return evacuation_id

    def get(self, evacuation_id: str) -> Evacuation:
        raw = cast(dict[str, str], self.r.hgetall(job_key(evacuation_id)))
        if not raw:
            raise JobNotFound(f"no job {evacuation_id!r}")
        if raw.get("kind") != EVACUATION_KIND:
            raise JobNotFound(f"{evacuation_id} is a migration job, not an evacuation")
        children = cast(dict[str, str], self.r.hgetall(children_key(evacuation_id)))
        return Evacuation(
            id=raw["id"],
            spec=EvacuationSpec.model_validate_json(raw["spec"]),
            state=EvacuationState(raw["state"]),
            origin=raw.get("origin", ""),
            created=datetime.fromisoformat(raw["created"]),
            updated=datetime.fromisoformat(raw["updated"]),
            reason=raw.get("reason"),
            abort_requested=raw.get("abort_requested"),
            plan=_parse_list(Placement, raw.get("plan")),
            children=children,
            outcome=_parse_list(DomainOutcome, raw.get("outcome")) or [],
            left_on_host=_parse_strings(raw.get("left_on_host")),
            request=raw.get(REQUEST_FIELD),
        )

    def transition(
        self, evacuation_id: str, target: EvacuationState, reason: str | None = None
    ) -> tuple[bool, EvacuationState | None]:
        terminal = "1" if target in EVACUATION_TERMINAL else "0"
        moved, previous = self._transition(
            keys=[job_key(evacuation_id), ACTIVE_EVACUATIONS],
            args=[
                target.value,
                now().isoformat(),
                reason or "",
                evacuation_id,
                terminal,
                *sorted(s.value for s in _FROM[target]),
            ],
        )
        return moved == 1, EvacuationState(previous) if previous else None

    def save_plan(self, evacuation_id: str, plan: list[Placement]) -> None:
        data = "[" + ",".join(p.model_dump_json() for p in plan) + "]"
        self.r.hset(job_key(evacuation_id), "plan", data)

    def save_outcome(
        self, evacuation_id: str, outcome: list[DomainOutcome], left_on_host: list[str]
    ) -> None:
        data = "[" + ",".join(o.model_dump_json() for o in outcome) + "]"
        self.r.hset(
            job_key(evacuation_id),
            mapping={"outcome": data, "left_on_host": ",".join(left_on_host)},
        )

    def request_abort(self, evacuation_id: str, reason: str) -> None:
        self.r.hset(job_key(evacuation_id), "abort_requested", reason)

    def may_redispatch(self, evacuation_id: str, every_s: float) -> bool:
        """True at most once per `every_s`: a lost task message is sent again, not flooded."""
        key = f"{job_key(evacuation_id)}:redispatched"
        return bool(self.r.set(key, now().isoformat(), nx=True, px=int(every_s * 1000)))

    def take_retry(self, evacuation_id: str, domain: str, limit: int) -> bool:
        """True if `domain` may be queued again (fewer than `limit` retries so far)."""
        key = f"{job_key(evacuation_id)}:retries"
        if int(cast(str | None, self.r.hget(key, domain)) or 0) >= limit:
            return False
        self.r.hincrby(key, domain, 1)
        return True

    def mark_reported(self, evacuation_id: str, job_id: str) -> bool:
        """True the first time a child's end is reported (its event is written once)."""
        return bool(self.r.sadd(f"{job_key(evacuation_id)}:reported", job_id))

    def active_ids(self) -> list[str]:
        return sorted(cast(set[str], self.r.smembers(ACTIVE_EVACUATIONS)))

    def append_event(self, evacuation_id: str, event: dict[str, Any]) -> str:
        return self.store.append_event(evacuation_id, event)


def _parse_list(model: type[M], raw: str | None) -> list[M] | None:
    if raw is None:
        return None
    return [model.model_validate(item) for item in json.loads(raw)]


def _parse_strings(raw: str | None) -> list[str]:
    return [s for s in (raw or "").split(",") if s]
