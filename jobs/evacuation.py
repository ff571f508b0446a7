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
from typing import Any, ClassVar, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.keys import (
    ACTIVE_EVACUATIONS,
    JOBS_INDEX,
    children_key,
    evacuation_redispatched_key,
    evacuation_reported_key,
    evacuation_retries_key,
    job_key,
)
from jobs.model import Record
from jobs.records import transition_keys
from jobs.request_signing import REQUEST_FIELD, RequestSigner, signed_record
from jobs.spec import MAX_BANDWIDTH_MIB, MAX_COMPLETION_TIMEOUT_S, HostRef, TimeoutAction
from jobs.states import EVACUATION_TABLE, EVACUATION_TERMINAL, EvacuationState, StateTable
from jobs.store import JobNotFound, JobStore, now
from jobs.transition import Transitioner

__all__ = ["ACTIVE_EVACUATIONS", "EVACUATION_TERMINAL", "EvacuationState"]

M = TypeVar("M", bound=BaseModel)
EVACUATION_KIND = "evacuation"
MAX_PARALLEL = 64


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


class Evacuation(Record):
    TABLE: ClassVar[StateTable] = EVACUATION_TABLE
    KIND: ClassVar[str | None] = EVACUATION_KIND

    spec: EvacuationSpec
    state: EvacuationState
    origin: str
    plan: list[Placement] | None = None
    children: dict[str, str] = Field(default_factory=dict)  # domain -> child job id
    outcome: list[DomainOutcome] = Field(default_factory=list)
    # Domains still on the host that the evacuation did not cover.
    left_on_host: list[str] = Field(default_factory=list)

    def route(self) -> tuple[str, str, str]:
        return f"{len(self.plan or [])} domains", self.spec.host, ",".join(self.spec.to) or "any"


class EvacuationStore:
    """Evacuation records, in the same id space, index and event streams as migration jobs."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.r = store.r
        self._transitions = Transitioner(self.r, EVACUATION_TABLE)

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
        """Move the evacuation to `target` if its state allows it (jobs/transition.py); an
        evacuation keeps no history list, its events tell the story."""
        out = self._transitions.run(
            transition_keys(evacuation_id, ACTIVE_EVACUATIONS),
            evacuation_id,
            target.value,
            now().isoformat(),
            reason=reason,
        )
        return out.moved, EvacuationState(out.previous) if out.previous else None

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
        key = evacuation_redispatched_key(evacuation_id)
        return bool(self.r.set(key, now().isoformat(), nx=True, px=int(every_s * 1000)))

    def take_retry(self, evacuation_id: str, domain: str, limit: int) -> bool:
        """True if `domain` may be queued again (fewer than `limit` retries so far)."""
        key = evacuation_retries_key(evacuation_id)
        if int(cast(str | None, self.r.hget(key, domain)) or 0) >= limit:
            return False
        self.r.hincrby(key, domain, 1)
        return True

    def mark_reported(self, evacuation_id: str, job_id: str) -> bool:
        """True the first time a child's end is reported (its event is written once)."""
        return bool(self.r.sadd(evacuation_reported_key(evacuation_id), job_id))

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
