"""What stopped a phase, judged in order; the first step that matches handles it:

    handed over    a warm shutdown left the migration to libvirtd: the phase stays started
    skipped        the job ended under the phase: free what it took after that end
    libvirt gone   the retry predicate: a phase that changed nothing is tried again; out of
                   tries, one before the migration fails the job, one from perform on stops
                   without a verdict (the guest may already run on the destination)
    ledger busy    this host's ledger cannot be written: from perform on, no verdict either
    failed         the phase's own verdict, from what libvirt showed
    Redis gone     no verdict: recovery takes the phase up from libvirt once Redis is back
    unexpected     anything else fails the job

"No verdict" is libvirt's last word kept: a job is never said to have failed while the
question of where its guest runs went unanswered (seen: a source libvirtd restarted at the
switch-over, a destination libvirtd restarted during finish; both jobs said `failed` of a
guest running on the destination). The phase stays started, in the record and this host's
ledger, with its claim held; recovery (worker/recovery.py) settles it from libvirt once it
answers, as it does the phase of a worker that died.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import NoReturn

import redis

from config.events import get_logger
from jobs.model import Job
from jobs.phases import PHASE_ORDER, RULES, Phase
from jobs.states import JobState
from worker.job_end import fail_job, rollback_destination_later, touched_destination
from worker.libvirt_host import LibvirtError, LibvirtUnavailable, is_connection_error
from worker.phase_errors import (
    Dropped,
    HandedOver,
    Interrupted,
    NeverLeft,
    PhaseFailed,
    RetryPhase,
)
from worker.phase_run import PhaseRun, phase_ended

log = get_logger()

FailureStep = Callable[[PhaseRun, Job, Exception], NoReturn]


def failure_step(exc: Exception) -> FailureStep:
    """The step that handles `exc` (see the module docstring for the order)."""
    if isinstance(exc, HandedOver):
        return _handed_over
    if isinstance(exc, Dropped):
        return _skipped
    if isinstance(exc, LibvirtUnavailable) or (
        isinstance(exc, LibvirtError) and is_connection_error(exc)
    ):
        return _libvirt_gone
    if isinstance(exc, sqlite3.Error):
        return _ledger_busy
    if isinstance(exc, PhaseFailed):
        return _failed
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return _redis_gone
    return _unexpected


def may_have_moved(phase: Phase) -> bool:
    """Whether the guest may already run on the destination once `phase` has begun."""
    return PHASE_ORDER.index(phase) >= PHASE_ORDER.index(Phase.PERFORM)


def _handed_over(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    assert isinstance(exc, HandedOver)
    log.warning("phase.handed_over", reason=exc.reason)
    raise exc


def _skipped(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    """The job ended under the phase: free anything the phase took after that end."""
    rt = run.rt
    phase_ended(run, job, error="skipped")
    if rt.store.state(job.id) in (JobState.CANCELLED, JobState.FAILED):
        rt.store.release_holds(job.id)
        if touched_destination(run.phase):
            rollback_destination_later(job)
    raise exc


def _libvirt_gone(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    """The retry predicate: a phase that changes nothing before it reaches libvirtd is tried
    again (tunables.phase_retries), given back as never started (its claim and its start
    record), so that recovery sends it again should the retry never come. Out of tries:
    before the migration the job fails (its guest has not left); from perform on there is
    no verdict (`_no_verdict`)."""
    rt, phase = run.rt, run.phase
    if isinstance(exc, LibvirtError):
        rt.libvirt.reset()
    retries = rt.settings.tunables.phase_retries.get(phase.value, 0)
    allowed = retries if RULES[phase].retryable else 0
    if run.attempt < allowed and not run.recovering:
        rt.store.give_back_phase(job.id, phase.value)
        rt.ledger.unclaim(job.id, phase.value)
        log.warning("phase.retrying", reason=str(exc), attempt=run.attempt + 1, of=allowed)
        raise RetryPhase(str(exc)) from exc
    reason = f"{phase.value} on {rt.host}: {exc}"
    if may_have_moved(phase):
        _no_verdict(run, job, reason)
    phase_ended(run, job, error=reason)
    log.error("phase.failed", reason=reason)
    fail_job(rt, job, phase, reason)
    raise PhaseFailed(reason) from exc


def _ledger_busy(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    """This host's ledger could not be written (locked, its disk full): from perform on the
    guest may have moved, and the job waits for recovery rather than being failed."""
    if may_have_moved(run.phase):
        _no_verdict(run, job, f"{run.phase.value} on {run.rt.host}: its ledger: {exc}")
    _unexpected(run, job, exc)


def ledger_unwritable(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    """This host's ledger refused the phase's claim (locked, its disk full) before anything
    ran: the claim in Redis is given back and the job says why it waits; the message is
    tried again while the phase has tries left (tunables.phase_retries), else dropped for
    recovery to send again. Never a traceback, never a silent wait."""
    rt, phase = run.rt, run.phase.value
    rt.store.give_back_phase(job.id, phase)
    why = f"{phase} waits for {rt.host}'s ledger: {exc}"
    rt.store.set_waiting_for(job.id, why)
    allowed = rt.settings.tunables.phase_retries.get(phase, 0)
    if run.attempt < allowed:
        log.warning("phase.retrying", reason=why, attempt=run.attempt + 1, of=allowed)
        raise RetryPhase(why) from exc
    log.warning("phase.deferred", reason=f"{why}; recovery sends it again")
    raise Dropped(why) from exc


def _no_verdict(run: PhaseRun, job: Job, reason: str) -> NoReturn:
    """Stop without a verdict: the phase stays started and claimed, the job says why it
    waits, and recovery settles it from libvirt once it answers."""
    why = (
        f"{reason}; whether {job.spec.domain} moved is libvirt's to say: recovery settles "
        "it once libvirt answers"
    )
    # The record first, then the event: a follower that sees the event finds the reason.
    with contextlib.suppress(redis.RedisError):  # Redis may be gone too: the log has it
        run.rt.store.set_waiting_for(job.id, why)
    log.error("phase.interrupted", reason=why)
    raise Interrupted(why)


def _failed(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    assert isinstance(exc, PhaseFailed)
    phase_ended(run, job, error=exc.reason)
    log.error("phase.failed", reason=exc.reason)
    fail_job(run.rt, job, run.phase, exc.reason, exc.final, never_left=isinstance(exc, NeverLeft))
    raise exc


def _redis_gone(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    """Redis stayed away longer than tunables.redis_retry_for. Nothing is known to have
    failed (a migration may well have completed): the phase stops without a verdict, and
    recovery takes it up from libvirt's state once Redis is back."""
    log.error("phase.interrupted", reason=f"Redis unreachable: {exc}")
    raise exc


def _unexpected(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    rt, phase = run.rt, run.phase
    reason = f"{phase.value} on {rt.host} failed unexpectedly: {exc}"
    phase_ended(run, job, error=reason)
    log.exception("phase.failed", reason=reason)
    fail_job(rt, job, phase, reason)
    raise PhaseFailed(reason) from exc
