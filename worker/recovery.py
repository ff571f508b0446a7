"""Bringing every job this host has a part in to a true state, whatever was interrupted.

Run when the worker starts and then every `watchdog_interval` (worker/keeper.py). For each
live job it finds the step the job is at, and:

- a step of this host's that started but is not running in this process (the worker died, or
  lost Redis mid-phase): recover it from libvirt's real state, then resume the chain;
- a step of this host's that never started although it should have: send it again (phase
  claims drop the copy if the first message turns up after all);
- a step of another host whose worker has no heartbeat (for `stall_after`, on this process's
  own consecutive looks too): mark the job `stalled`, with why; its owner puts it back (not
  a job still in line: a stall would take it out of its lane for good).

How a started step is settled is the phase registry's recovery rule (jobs/phases.py): re-run
its checks, or, for perform, re-attach (worker/recovery_perform.py): peer-to-peer migrations
run on in libvirtd while their worker is gone; managed-direct ones are aborted by libvirt
(the guest found on the source, resumed if paused; the destination's rollback cleans up).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import structlog

from config.celery import app
from config.events import get_logger
from jobs.keys import job_key
from jobs.model import Job
from jobs.phases import PHASE_ORDER, RULES, Phase, Recovery, next_phase, owner_of
from jobs.record_read import REDIS_OUTAGES, KeyUnreadable, MalformedRecord
from jobs.states import RESUMABLE, JobState
from jobs.store import JobNotFound, now
from jobs.workflow import migration_chain
from worker import phases_all_ended
from worker.job_end import holds_slots, job_context, verified
from worker.ledger_word import ended_here, given_up_here, started_here
from worker.phase_errors import Dropped, PhaseFailed
from worker.phase_frame import execute_phase
from worker.recovery_perform import recover_perform
from worker.registry import BOUND
from worker.runtime import Runtime

log = get_logger()
LOOK_GAP_TICKS = 2  # recovery looks further apart (in ticks) are not consecutive


@dataclass(frozen=True)
class Step:
    phase: Phase
    started: bool
    since: datetime  # when the job last moved: the step's start, or the previous step's end


def current_step(job: Job) -> Step | None:
    """The phase the job is in (started, not ended) or the next one to run."""
    since = job.updated
    for phase in PHASE_ORDER:
        record = job.phases.get(phase.value)
        if record is None:
            return Step(phase, False, since)
        if record.ended is None:
            return Step(phase, True, record.started)
        since = max(since, record.ended)
    return None


def sweep(rt: Runtime) -> None:
    """One pass over every live job (see the module docstring), each on its own: one that
    cannot be read or whose attendance fails is said in one line, and the pass goes on; a
    Redis outage ends it, as does a set of live jobs that is not a set (said each pass)."""
    try:
        job_ids = rt.store.active_ids()
    except KeyUnreadable as exc:
        log.error("keeper.key_unreadable", duty="recovery", key=exc.key, reason=str(exc))
        return
    for job_id in job_ids:
        try:
            _sweep_one(rt, job_id)
        except MalformedRecord as exc:
            log.warning("record.unreadable", key=job_key(job_id), reason=str(exc))
        except JobNotFound:
            continue  # gone meanwhile
        except REDIS_OUTAGES:
            raise
        except Exception as exc:  # one job's bad data or a bug must not starve the rest
            log.exception("keeper.error", duty="recovery", key=job_key(job_id), error=str(exc))


def _sweep_one(rt: Runtime, job_id: str) -> None:
    job = rt.store.get(job_id)
    if job.terminal:
        rt.store.release_holds(job.id)  # a crash between the transition and the cleanup
        return
    if rt.host not in (job.spec.src, job.spec.dst):
        return
    step = current_step(job)
    if step is None:  # a live job with no phase left: libvirt says how it ended
        phases_all_ended.settle(rt, job)
        return
    context = job_context(job, step.phase.value)
    with (  # a failure is recorded on the job already
        structlog.contextvars.bound_contextvars(**context),
        contextlib.suppress(Dropped, PhaseFailed),
    ):
        _attend(rt, job, step)


def _since_s(then: datetime) -> float:
    return (now() - then).total_seconds()


def _attend(rt: Runtime, job: Job, step: Step) -> None:
    step_owner = owner_of(job.spec, step.phase)
    if step_owner != rt.host:
        _watch_peer(rt, job, step, step_owner)
        return
    was = job.stalled_from if job.state is JobState.STALLED else None
    if was is not None and was in RESUMABLE:  # (a Redis write: never an end, jobs/states.py)
        # Also while the phase runs here: a peer judged this worker gone in a Redis outage.
        back, _ = rt.store.transition(job.id, was, host=rt.host, only_from=JobState.STALLED)
        if back:  # (not when the job moved on meanwhile: its own phase said so)
            log.info("job.state", state=was.value, reason="owner is back")
        job = rt.store.get(job.id)
    if rt.marked(job.id, step.phase.value):
        return
    if step.started:
        if ended_here(rt, job, step.phase):
            return
        if verified(rt, job):  # nothing is recovered for a request no trusted key signed
            _recover_in_background(rt, job, step.phase)
    elif job.admitted is None:
        return  # still waiting for a slot: admission, not recovery, starts it (and checks it)
    elif _quiet_s(rt, job, step) > rt.settings.tunables.redispatch_after and verified(rt, job):
        # (nor is anything sent again for a request no trusted key signed)
        if started_here(rt, job.id, step.phase) or given_up_here(rt, job, step.phase):
            return
        if not holds_slots(rt, job, resend=True):
            return
        give_back_dead_claim(rt, job.id, step.phase)
        log.warning("phase.redispatched", reason=f"not started after {_since_s(step.since):.0f}s")
        rt.store.mark_redispatched(job.id, step.phase.value)
        migration_chain(app, job.id, job.spec, start=step.phase).apply_async()


def give_back_dead_claim(rt: Runtime, job_id: str, phase: Phase) -> bool:
    """Give back this host's claim on a phase that never started and that no live worker runs.

    The worker that took it died between the claim and the phase's start record, which comes
    before the phase's body: the phase changed nothing. Kept, the claim would drop every
    message sent again as a duplicate, and the job would wait for ever with its slots held
    (seen: a worker killed mid-drain, its evacuation's child stuck `prepared`). Called only
    for a step quiet for `redispatch_after`, long past a live claim's few ms to its start."""
    if rt.store.claim_of(job_id, phase.value) != rt.host:
        return False
    if rt.store.runner(job_id, phase.value) is not None:
        return False
    if started_here(rt, job_id, phase):
        return False
    rt.store.unclaim_phase(job_id, phase.value)
    rt.ledger.unclaim(job_id, phase.value)
    log.warning("phase.unclaimed", reason="its claimant died before the phase started")
    return True


def _quiet_s(rt: Runtime, job: Job, step: Step) -> float:
    """How long nothing has happened to a step that should have started: since the job last
    moved, was admitted, or the step was last sent again (so re-sends keep their back-off)."""
    assert job.admitted is not None
    last = max(step.since, job.admitted)
    resent = rt.store.redispatched_at(job.id, step.phase.value)
    return _since_s(max(last, resent) if resent else last)


def _watch_peer(rt: Runtime, job: Job, step: Step, peer: str) -> None:
    """A step that is another host's: leave it to that host while it has a worker taking
    work, or a live worker running this very step; otherwise say why the job waits, and
    mark it `stalled` once it has waited `stall_after`."""
    tunables = rt.settings.tunables
    if job.state is JobState.STALLED or job.in_line:
        return
    if rt.store.alive(peer):
        rt.peers_unseen.pop(peer, None)
        return
    unseen_s = _unseen_for(rt, peer, tunables.watchdog_interval)
    if step.started and rt.store.runner(job.id, step.phase.value) is not None:
        return  # a draining worker still runs it, and keeps its mark alive
    draining = rt.store.draining(peer)
    if draining is not None:
        why = (
            f"{peer}'s worker is shutting down (draining since {draining.get('since')}) "
            f"and takes no new work; {step.phase.value} waits for a worker on {peer}"
        )
    else:
        why = (
            f"{peer}'s worker has not been seen for {tunables.stall_after:.0f}s "
            f"while the job was {job.state.value} ({step.phase.value})"
        )
    # The record's time and this process's own looks: after a Redis outage every heartbeat
    # ran out, and the live peer's is renewed within seconds.
    if _since_s(step.since) <= tunables.stall_after or unseen_s <= tunables.stall_after:
        if draining is not None and job.waiting_for != why:
            rt.store.set_waiting_for(job.id, why)
            log.info("job.waiting", reason=why)
        return
    moved, _ = rt.store.transition(job.id, JobState.STALLED, host=rt.host, reason=why)
    if moved:
        log.warning("job.state", state=JobState.STALLED.value, reason=why)


def _unseen_for(rt: Runtime, peer: str, tick: float) -> float:
    """Seconds this process has seen `peer` without a live worker on consecutive looks (a gap
    between looks, Redis away, starts again: every heartbeat ran out, the live peer's too)."""
    now = time.monotonic()
    first, last = rt.peers_unseen.get(peer, (now, now))
    if now - last > LOOK_GAP_TICKS * tick:
        first = now
    rt.peers_unseen[peer] = (first, now)
    return now - first


def _resume_after(job: Job, phase: Phase) -> None:
    following = next_phase(phase)
    if following is not None:
        migration_chain(app, job.id, job.spec, start=following).apply_async()


def _recover_in_background(rt: Runtime, job: Job, phase: Phase) -> None:
    """Recover on a thread of its own: waiting for a migration must not stop the heartbeat.
    Only libvirt can say how the phase ended: while this host's libvirtd does not answer,
    the step waits (said once), and the next sweep asks again."""
    holder = rt.begin(job.id, phase.value)
    if holder is not None:
        noted = (job.id, phase.value, holder)
        if holder != rt.worker_id and noted not in rt.noted_runners:
            rt.noted_runners.add(noted)
            log.info("phase.not_recovered", reason=f"worker {holder} on {rt.host} still runs it")
        return
    fresh = _still_interrupted(rt, job.id, phase)
    if fresh is None:
        rt.end(job.id, phase.value)
        return
    job = fresh
    context = structlog.contextvars.get_contextvars()

    def work() -> None:
        try:
            with (
                structlog.contextvars.bound_contextvars(**context),
                contextlib.suppress(Dropped, PhaseFailed),
            ):
                _recover(rt, job, phase)
        except Exception as exc:  # never let one job's recovery kill the thread silently
            log.exception("phase.recovery_failed", error=str(exc))
        finally:
            rt.end(job.id, phase.value)

    threading.Thread(target=work, name=f"recover-{job.id}", daemon=True).start()


def _libvirt_answers(rt: Runtime, job: Job, phase: Phase) -> bool:
    """Whether this host's libvirtd answers now; the wait for it is said once per step."""
    if rt.libvirt_answers():
        return True
    if (job.id, phase.value) not in rt.noted_libvirt_waits:
        rt.noted_libvirt_waits.add((job.id, phase.value))
        log.warning("phase.not_recovered", reason=f"{rt.host}'s libvirtd does not answer")
    return False


def _still_interrupted(rt: Runtime, job_id: str, phase: Phase) -> Job | None:
    """Read the job again now that the phase is marked as ours: the sweep's copy may predate
    the phase ending normally in this process, and re-running a finished phase (booking
    memory, making disks) after the job moved on must never happen."""
    try:
        job = rt.store.get(job_id)
    except JobNotFound:
        return None
    step = current_step(job)
    if job.terminal or step is None or step.phase is not phase or not step.started:
        return None
    return job


def _recover(rt: Runtime, job: Job, phase: Phase) -> None:
    """This host started `phase` and then lost it: settle it from libvirt's real state, as
    the phase registry says (jobs/phases.py `Recovery`); only once its libvirtd answers."""
    if not _libvirt_answers(rt, job, phase):
        return
    if job.state is not JobState.POSTCOPY_PAUSED:  # that one is looked at every tick, quietly
        log.warning("phase.recovering", reason="started here but not running in this worker")
    if RULES[phase].recovery is Recovery.REATTACH:
        if recover_perform(rt, job):
            _resume_after(job, phase)
        return
    execute_phase(rt, job.id, phase, BOUND[phase].run, recovering=True)
    if not rt.store.get(job.id).terminal:
        _resume_after(job, phase)
