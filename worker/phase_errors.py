"""How a phase, or the frame around it, says that it stops: the worker's domain exceptions.

Celery's `Ignore` is not among them: worker/tasks.py turns `Dropped` into it at the very edge,
and nothing else in the worker knows Celery's way of saying "drop this message".
"""

from __future__ import annotations

from jobs.states import JobState


class PhaseFailed(Exception):
    """A phase cannot go on; `reason` is one line an operator can act on."""

    final = JobState.FAILED

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NeverLeft(PhaseFailed):
    """libvirt shows the guest still on its source and not on its destination after the
    migration: the job failed, whatever its record says of a verified finish."""


class PhaseCancelled(PhaseFailed):
    """The operator aborted the job; the guest stays where it was."""

    final = JobState.CANCELLED


class RetryPhase(Exception):
    """The phase could not reach its libvirtd and may be tried again (tunables.phase_retries)."""


class Dropped(Exception):
    """The message is dropped without a verdict on the job: it was not for this host, the
    phase already ran, the job ended meanwhile, ... (said in an event where it happens)."""


class PhaseSkipped(Dropped):
    """Raised by a phase: the job ended under it (an abort, a failure elsewhere), so the
    phase stops quietly and the frame cleans up behind it."""


class HandedOver(Dropped):
    """The phase goes on without this process (a peer-to-peer migration libvirtd carries on
    through this worker's warm shutdown): it stays started, for the next worker to recover."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Interrupted(Dropped):
    """The phase stopped without a verdict: whether the guest moved is libvirt's to say, and
    libvirt (or this host's ledger) could not be asked. It stays started, for recovery to
    settle once libvirt answers (worker/phase_failure.py)."""
