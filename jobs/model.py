"""A job as read back from the store: what producers and CLIs show."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from config.events import job_event
from jobs.spec import MigrationSpec
from jobs.states import TERMINAL, JobState


def migration_event(
    job_id: str, migration: MigrationSpec, name: str, host: str, **fields: Any
) -> dict[str, Any]:
    """An event of a migration job written straight to its stream (by a producer, an
    admission pass or an abort), in the same shape as a worker's."""
    return job_event(
        name,
        host,
        job_id=job_id,
        domain=migration.domain,
        src=migration.src,
        dst=migration.dst,
        **fields,
    )


class PhaseRecord(BaseModel):
    phase: str
    host: str
    started: datetime
    ended: datetime | None = None
    error: str | None = None


class Transition(BaseModel):
    state: JobState
    at: datetime
    host: str
    reason: str | None = None


def elapsed_s(created: datetime, updated: datetime, terminal: bool) -> float:
    """How long a job ran (until its last update once it has ended, until now before)."""
    end = updated if terminal else datetime.now(created.tzinfo)
    return (end - created).total_seconds()


class Job(BaseModel):
    id: str
    spec: MigrationSpec
    state: JobState
    created: datetime
    updated: datetime
    reason: str | None = None
    stalled_from: JobState | None = None
    abort_requested: str | None = None
    # When libvirt switched the migration to post-copy: past that, it cannot be aborted.
    postcopy_since: datetime | None = None
    # Admission (jobs/admission.py): when the job got its concurrency slots, or why it waits.
    admitted: datetime | None = None
    waiting_for: str | None = None
    parent: str | None = None  # the evacuation this job belongs to
    parent_limit: int | None = None  # that evacuation's --max-parallel
    # The producer's signed request (jobs/request_signing.py); workers verify it before acting.
    request: str | None = None
    facts: dict[str, Any] = {}
    handoff: dict[str, Any] = {}
    result: dict[str, Any] = {}
    phases: dict[str, PhaseRecord] = {}
    transitions: list[Transition] = []

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def duration_s(self) -> float:
        return elapsed_s(self.created, self.updated, self.terminal)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "domain": self.spec.domain,
            "src": self.spec.src,
            "dst": self.spec.dst,
            "created": self.created.isoformat(),
            "duration_s": round(self.duration_s, 3),
            "reason": self.reason or self.waiting_for,
            "parent": self.parent,
        }
