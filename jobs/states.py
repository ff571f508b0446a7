"""A migration job's states and the transitions allowed between them."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    PREFLIGHT = "preflight"
    PREPARED = "prepared"
    MIGRATING = "migrating"
    FINISHING = "finishing"
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


def allowed_sources(target: JobState) -> frozenset[JobState]:
    """The states from which a job may move to `target`."""
    if target in (JobState.FAILED, JobState.CANCELLED, JobState.ROLLED_BACK):
        return frozenset(s for s in JobState if s not in TERMINAL)
    return frozenset(src for src, dst in _FORWARD.items() if dst == target)
