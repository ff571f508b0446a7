"""The states of a migration job and of an evacuation, and the transitions allowed between them.

Each kind has one `StateTable`; the store's single transition script (jobs/transition.py) is
driven by it, so what a state means to Redis (terminal, a stall, success) is said only here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    PREFLIGHT = "preflight"
    PREPARED = "prepared"
    MIGRATING = "migrating"
    # A post-copy that failed (the guest paused on the source, hung on the destination) is
    # being resumed; the job keeps its lease, reservations and slots meanwhile.
    POSTCOPY_RECOVERING = "postcopy_recovering"
    # drover stopped resuming it (tunables.postcopy_recovery_timeout): the reason says where
    # the guest is; still live, still holding, until someone resumes it and it lands.
    POSTCOPY_PAUSED = "postcopy_paused"
    FINISHING = "finishing"
    STALLED = "stalled"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"
    # A dry run (`drover migrate --dry-run`) whose every pre-check passed: nothing moved.
    CHECKED = "checked"


TERMINAL = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.ROLLED_BACK,
        JobState.CHECKED,
    }
)

# Forward progress is one step at a time; any live state may end failed or cancelled.
_FORWARD = {
    JobState.QUEUED: JobState.PREFLIGHT,
    JobState.PREFLIGHT: JobState.PREPARED,
    JobState.PREPARED: JobState.MIGRATING,
    JobState.MIGRATING: JobState.FINISHING,
    JobState.FINISHING: JobState.SUCCEEDED,
}


# Beside the forward steps: a failed post-copy is recovered, given up on, taken up again (a
# restarted worker), and goes back to migrating once libvirt copies again.
_POSTCOPY_SOURCES = {
    JobState.POSTCOPY_RECOVERING: frozenset({JobState.MIGRATING, JobState.POSTCOPY_PAUSED}),
    JobState.POSTCOPY_PAUSED: frozenset({JobState.POSTCOPY_RECOVERING}),
    JobState.MIGRATING: frozenset({JobState.POSTCOPY_RECOVERING, JobState.POSTCOPY_PAUSED}),
}
# Where a post-copy failed: the guest is on both hosts' books and must not be rolled back.
POSTCOPY_STATES = frozenset({JobState.POSTCOPY_RECOVERING, JobState.POSTCOPY_PAUSED})

LIVE = frozenset(s for s in JobState if s not in TERMINAL)
# What a stalled job goes back to once its owner is back: a live state a phase runs in. Its
# `stalled_from` is a Redis write like any other; an end written there (a probe's
# `succeeded`) made the owner's recovery end a job whose guest was still migrating.
RESUMABLE = LIVE - {JobState.QUEUED, JobState.STALLED}


def allowed_sources(target: JobState) -> frozenset[JobState]:
    """The states from which a job may move to `target`.

    `stalled` is entered from any live state when the host that owns the next step is gone,
    and left (by that host's recovery) to whichever live state the job really is in.
    """
    if target in TERMINAL and target is not JobState.SUCCEEDED:
        return LIVE
    if target is JobState.STALLED:
        return LIVE - {JobState.STALLED}
    forward = frozenset(src for src, dst in _FORWARD.items() if dst == target)
    return forward | _POSTCOPY_SOURCES.get(target, frozenset()) | {JobState.STALLED}


# The `kind` field of an evacuation's record (a migration job's has none): here, beside its
# states, so that telling the two apart in a listing needs no evacuation model.
EVACUATION_KIND = "evacuation"


class EvacuationState(StrEnum):
    """queued -> planning -> running -> drained | partial | cancelled; planning -> planned
    (a dry run); any live state -> failed (the plan itself could not be made)."""

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
EVACUATION_LIVE = frozenset(EvacuationState) - EVACUATION_TERMINAL
_EVACUATION_FROM: dict[EvacuationState, frozenset[EvacuationState]] = {
    EvacuationState.PLANNING: frozenset({EvacuationState.QUEUED}),
    EvacuationState.RUNNING: frozenset({EvacuationState.PLANNING}),
    EvacuationState.PLANNED: frozenset({EvacuationState.PLANNING}),
    EvacuationState.DRAINED: frozenset({EvacuationState.RUNNING}),
    EvacuationState.PARTIAL: frozenset({EvacuationState.RUNNING}),
    EvacuationState.CANCELLED: EVACUATION_LIVE,
    EvacuationState.FAILED: EVACUATION_LIVE,
}


def evacuation_sources(target: EvacuationState) -> frozenset[EvacuationState]:
    """The states from which an evacuation may move to `target` (none into `queued`)."""
    return _EVACUATION_FROM.get(target, frozenset())


@dataclass(frozen=True)
class StateTable:
    """What the transition script needs to know of one kind's states.

    `terminal`: entering one ends the record (its active mark, admission slots and memory
    reservations are given back in the same step). `stall`: the state whose entry records
    where it came from and whose exit clears that and the stall's reason. `success`: entering
    it drops a pending abort request (one that came too late to act on).
    """

    terminal: frozenset[str]
    sources: Callable[[str], frozenset[str]]
    stall: str = ""
    success: str = ""


JOB_TABLE = StateTable(
    terminal=frozenset(s.value for s in TERMINAL),
    sources=lambda target: frozenset(s.value for s in allowed_sources(JobState(target))),
    stall=JobState.STALLED.value,
    success=JobState.SUCCEEDED.value,
)
EVACUATION_TABLE = StateTable(
    terminal=frozenset(s.value for s in EVACUATION_TERMINAL),
    sources=lambda target: frozenset(s.value for s in evacuation_sources(EvacuationState(target))),
)
