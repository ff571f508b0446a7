"""A migration job's states and the transitions allowed between them."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    PREFLIGHT = "preflight"
    PREPARED = "prepared"
    MIGRATING = "migrating"
    FINISHING = "finishing"
    STALLED = "stalled"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"


TERMINAL = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.ROLLED_BACK}
)

# Forward progress is one step at a time; any live state may end failed or cancelled.
_FORWARD = {
    JobState.QUEUED: JobState.PREFLIGHT,
    JobState.PREFLIGHT: JobState.PREPARED,
    JobState.PREPARED: JobState.MIGRATING,
    JobState.MIGRATING: JobState.FINISHING,
    JobState.FINISHING: JobState.SUCCEEDED,
}


LIVE = frozenset(s for s in JobState if s not in TERMINAL)


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
    return forward | {JobState.STALLED}
