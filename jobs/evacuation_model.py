"""An evacuation's record: its states, the operator's spec, the plan and the outcome.

The state machine and the worker's part are described in jobs/evacuation.py; the records are
read and written there (EvacuationStore) and started through jobs/evacuations.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import BaseModel, Field, field_validator, model_validator

from jobs.drain_options import DrainOptions
from jobs.model import Job, Record
from jobs.spec import HostRef, MigrationSpec
from jobs.states import EVACUATION_KIND as EVACUATION_KIND
from jobs.states import EVACUATION_TABLE, EVACUATION_TERMINAL, EvacuationState, StateTable

__all__ = ["EVACUATION_TERMINAL", "EvacuationState"]

MAX_PARALLEL = 64
# What the evacuated host's worker writes into the record besides the transitions
# (worker/evacuation.py `refusal`): `started`, its own signed word that it started the
# evacuation (kind START_KIND, renewed while the evacuation lives, so that the producer's
# request need not be young for as long as the evacuation runs); `ended`, when it ended.
STARTED_FIELD = "started"
ENDED_FIELD = "ended"
START_KIND = "evacuation-start"


class EvacuationSpec(DrainOptions):
    """What the operator asked for. Child migrations are live and peer-to-peer; a persistent
    domain's definition moves with it (--persistent --undefine-source), so nothing of it is
    left on the host going into maintenance. The options every child carries are
    DrainOptions' (jobs/drain_options.py), shared with scheduled drains."""

    host: HostRef
    to: list[HostRef] = Field(default_factory=list, strict=False)  # names strict
    max_parallel: int | None = Field(default=None, ge=1, le=MAX_PARALLEL)
    include_inactive: bool = False
    dry_run: bool = False

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
        problems = self.drain_problems()
        if problems:
            raise ValueError(problems[0])
        return self

    def child(
        self, domain: str, dst: str, *, active: bool, persistent: bool, local_disks: bool = False
    ) -> MigrationSpec:
        """The migration that moves `domain` to `dst`: live and peer-to-peer, a persistent
        definition moving with the guest. Each child runs with its effective policy (this
        spec's `policy` over the domain's, its host's and group's), post-copy included when
        that policy allows it: a busy guest that never converges is exactly what holds a drain
        up. An offline child moves only a definition: nothing to tunnel, cap, converge or time
        out, and no policy applies to it. `--copy-storage` goes to guests with local disks
        (`local_disks`) only (jobs/drain_options.py)."""
        return MigrationSpec(
            domain=domain,
            src=self.host,
            dst=dst,
            live=active,
            offline=not active,
            persistent=persistent,
            undefine_source=persistent,
            **self.child_fields(active=active, local_disks=local_disks),
        )


class Placement(BaseModel):
    """One domain of the plan: where it goes, or why it cannot go anywhere."""

    domain: str
    uuid: str
    memory_mib: int
    active: bool
    persistent: bool
    group: str | None = None
    local_disks: int = 0  # writable file-backed disks (worker/storage.py): --copy-storage
    destination: str | None = None
    estimate_s: float | None = None
    # The child's migration policy, and what it will take to converge when libvirt knows
    # the guest's dirty rate (e.g. "post-copy likely"): worker/evacuation_plan.py.
    policy: str | None = None
    convergence: str | None = None
    reason: str | None = None  # why it was not placed
    # Destinations whose own pre-checks refused its child, and why: not chosen again when it
    # is placed anew (worker/evacuation_plan.py `replanned`).
    refused_by: dict[str, str] = Field(default_factory=dict)


class DomainOutcome(BaseModel):
    """Where a domain of the plan is at the end, as libvirt on both hosts reports it."""

    domain: str
    job_id: str | None
    job_state: str | None
    on_source: bool  # still defined or running on the evacuated host
    # Its destination, if libvirt there shows it as planned: running, or only defined for a
    # guest moved shut off (probe: the name alone said "running" of those);
    # `destination_state` is libvirt's state of it there.
    running_on: str | None
    destination_state: str | None = None
    # Why its destination's libvirtd could not be asked (then nothing is known there).
    destination_unreachable: str | None = None
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


Genuine = Callable[[Job], bool] | None  # whether a record's request was signed by a trusted key


@dataclass
class Children:
    """An evacuation's child jobs by domain (`jobs`); among them those its children list did
    not name (`refound`); and why a record that might have been one could not be read."""

    jobs: dict[str, Job] = field(default_factory=dict)
    refound: dict[str, Job] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
