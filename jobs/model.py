"""A job or an evacuation as read back from the store: what producers and CLIs show.

`Record` holds what both kinds share (identity, state, times, reason, a pending abort, the
signed request) and says once what "ended", "how long" and the one-line summary mean; each
kind adds its own spec, its state type and its state table (jobs/states.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import AwareDatetime, BaseModel

from config.policy_model import EffectivePolicy
from jobs.record import Handoff, MalformedRecord, Result, SourceFacts
from jobs.spec import MigrationSpec
from jobs.states import JOB_TABLE, JobState, StateTable


def migration_event(
    job_id: str, migration: MigrationSpec, name: str, host: str, **fields: Any
) -> dict[str, Any]:
    """An event of a migration job written straight to its stream (by a producer, an
    admission pass or an abort), in the same shape as a worker's."""
    from config.events import job_event  # its logging stack is not needed to read records

    return job_event(
        name,
        host,
        job_id=job_id,
        domain=migration.domain,
        src=migration.src,
        dst=migration.dst,
        **fields,
    )


def queued_event(
    job_id: str, migration: MigrationSpec, origin: str, **fields: Any
) -> dict[str, Any]:
    """The first event of every migration job (queued, its whole spec), however it started."""
    return migration_event(
        job_id,
        migration,
        "job.queued",
        origin,
        state=JobState.QUEUED.value,
        spec=migration.model_dump(mode="json"),
        **fields,
    )


class PhaseRecord(BaseModel):
    phase: str
    host: str
    started: AwareDatetime
    ended: AwareDatetime | None = None
    error: str | None = None


class Transition(BaseModel):
    state: JobState
    at: AwareDatetime
    host: str
    reason: str | None = None


# How far ahead of this host's clock a record's time may be and still be shown: the hosts'
# clocks differ a little (NTP keeps them within this); an end further in the future was
# written so (a probe's `updated` of 9999-12-31 showed as 251605878492 s).
CLOCK_SKEW = timedelta(minutes=5)


def elapsed_s(created: datetime, updated: datetime, terminal: bool) -> float | None:
    """How long a record ran (until its last update once it has ended, until now before);
    None when its times contradict each other (its end, or now, before its start: written
    into Redis by hand, or a clock set back). A probe's forged `updated` showed as a negative
    duration in `drover jobs`: no figure is better than one that cannot be."""
    now = datetime.now(created.tzinfo)
    end = updated if terminal else now
    if end > now + CLOCK_SKEW:  # an end still to come: written so, as one before the start
        return None
    seconds = (end - created).total_seconds()
    return seconds if seconds >= 0 else None


class Record(BaseModel):
    """What a migration job and an evacuation have in common."""

    TABLE: ClassVar[StateTable]
    KIND: ClassVar[str | None] = None  # shown in a summary (migrations show none)

    id: str
    state: StrEnum
    # Every time drover reads from a record carries its offset (drover writes UTC): one
    # without would fail the first comparison with a time that has one, deep in a duty, so
    # such a record is unreadable (MalformedRecord, jobs/record_read.py) instead.
    created: AwareDatetime
    updated: AwareDatetime
    reason: str | None = None
    abort_requested: str | None = None
    # The producer's signed request (jobs/request_signing.py); workers verify it before acting.
    request: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state.value in self.TABLE.terminal

    @property
    def duration_s(self) -> float | None:
        return elapsed_s(self.created, self.updated, self.terminal)

    def route(self) -> tuple[str, str, str]:
        """(what moves, from, to) in words, for a summary."""
        raise NotImplementedError

    def shown_reason(self) -> str | None:
        return self.reason

    def summary(self) -> dict[str, Any]:
        what, src, dst = self.route()
        duration = self.duration_s
        head: dict[str, Any] = {"id": self.id}
        if self.KIND is not None:
            head["kind"] = self.KIND
        return head | {
            "state": self.state.value,
            "domain": what,
            "src": src,
            "dst": dst,
            "created": self.created.isoformat(),
            "duration_s": None if duration is None else round(duration, 3),
            "reason": self.shown_reason(),
        }


class Job(Record):
    TABLE: ClassVar[StateTable] = JOB_TABLE

    spec: MigrationSpec
    state: JobState
    stalled_from: JobState | None = None
    # When libvirt switched the migration to post-copy: past that, it cannot be aborted.
    postcopy_since: AwareDatetime | None = None
    # Admission (jobs/admission.py): when the job got its concurrency slots, or why it waits.
    admitted: AwareDatetime | None = None
    waiting_for: str | None = None
    parent: str | None = None  # the evacuation this job belongs to
    parent_limit: int | None = None  # that evacuation's --max-parallel
    facts: SourceFacts | None = None  # None until the source's preflight has looked
    handoff: Handoff = Handoff()
    # perform: the migration policy the source worker runs the job with, and where each of
    # its values came from (jobs/policy_choice.py); None until perform resolved it.
    policy: EffectivePolicy | None = None
    result: Result = Result()
    phases: dict[str, PhaseRecord] = {}
    transitions: list[Transition] = []
    # The destination's signed receipt of its prepare (jobs/prepared_receipt.py): perform
    # migrates only with it.
    prepared: str | None = None

    @property
    def in_line(self) -> bool:
        """Queued, never admitted, nothing run: it waits in its lane (jobs/lanes.py)."""
        return self.state is JobState.QUEUED and self.admitted is None and not self.phases

    @property
    def source(self) -> SourceFacts:
        """The source's facts, for a phase that runs after preflight recorded them."""
        if self.facts is None:
            raise MalformedRecord(f"job {self.id}: no facts of the source recorded")
        return self.facts

    def route(self) -> tuple[str, str, str]:
        return self.spec.domain, self.spec.src, self.spec.dst

    def shown_reason(self) -> str | None:
        return self.reason or self.waiting_for

    def summary(self) -> dict[str, Any]:
        return super().summary() | {"parent": self.parent}
