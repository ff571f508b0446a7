"""The Celery tasks: one per phase of the registry (worker/registry.py), each a thin shell
around the phase frame (worker/phase_frame.py); and the side tasks (rollback, post-copy
switch, evacuation).

Every task takes only a job id; everything else is read back from the job store and parsed
again, so a message carries nothing the worker would have to trust. This is the edge where
the worker's `Dropped` becomes Celery's `Ignore` (the one place that raises it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from celery import Task
from celery.exceptions import Ignore
from celery.signals import worker_init, worker_ready, worker_shutting_down

from config.celery import app, use_consumer_transport
from config.events import get_logger
from config.message_checks import rejections_in_one_line
from config.security import JOB_ID
from config.settings import current
from jobs.model import Job
from jobs.phases import (
    ABORT_NOTICE_TASK,
    CANCEL_NOTICE_TASK,
    EVACUATE_TASK,
    FORCE_COMPLETE_TASK,
    PHASE_ORDER,
    POSTCOPY_TASK,
    ROLLBACK_DESTINATION_TASK,
    TUNE_TASK,
    Phase,
    task_name,
)
from jobs.store import JobNotFound
from worker import evacuation
from worker.cancel_notice import note_abort, note_cancel
from worker.job_end import job_context, verified
from worker.keeper import begin_drain, start_keeper
from worker.libvirt_events import start_event_loop
from worker.main import WorkerStartError, check_security
from worker.migration_control import force_complete, start_postcopy, tune
from worker.phase_errors import Dropped, PhaseFailed, RetryPhase
from worker.phase_frame import execute_phase
from worker.registry import BOUND
from worker.rollback import rollback_reconnecting
from worker.runtime import Runtime, runtime_for_node

log = get_logger()


def _runtime(task: Task) -> Runtime:
    return runtime_for_node(str(task.request.hostname))


@contextmanager
def _edge() -> Iterator[None]:
    """Celery's `Ignore` for whatever the worker dropped (no result, no retry, no failure)."""
    try:
        yield
    except Dropped:
        raise Ignore() from None


def _checked_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        log.warning("message.rejected", reason="malformed job id", value=repr(job_id)[:80])
        raise Dropped("malformed job id")
    return job_id


def _run(task: Task, phase: Phase, job_id: object) -> str:
    rt = _runtime(task)
    with _edge():
        checked = _checked_job_id(job_id)
        try:
            execute_phase(rt, checked, phase, BOUND[phase].run, attempt=task.request.retries)
        except RetryPhase as exc:
            # No kwargs: the message's envelope is its own; the retry gets a fresh one as it
            # is published (config/celery.py), and the task itself takes only the job id.
            raise task.retry(
                kwargs={}, countdown=rt.settings.tunables.retry_delay, max_retries=None
            ) from exc
    return checked


def _phase_task(phase: Phase) -> Any:
    """The task `drover.<phase>` (names are part of the signed envelope, routing and Flower)."""

    def run(self: Task, job_id: str) -> str:
        return _run(self, phase, job_id)

    run.__name__ = run.__qualname__ = phase.value
    return app.task(bind=True, name=task_name(phase), throws=(PhaseFailed,))(run)


PHASE_TASKS = {phase: _phase_task(phase) for phase in PHASE_ORDER}


@worker_init.connect
def _refuse_insecure_start(**_: object) -> None:
    """`celery -A config worker` too refuses to run unsigned unless the config says so."""
    try:
        check_security(current())
    except WorkerStartError as exc:
        raise SystemExit(f"drover: {exc}") from None


@worker_init.connect
def _drop_malformed_queue_items(**_: object) -> None:
    """Before the consumer connects: an item on the queue that is not a message is dropped,
    never raised out of the consumer's loop (config/broker_transport.py)."""
    use_consumer_transport(app, current())


@worker_init.connect
def _quiet_rejections(**_: object) -> None:
    """A discarded message costs one line of log at most (config/message_checks.py)."""
    rejections_in_one_line()


@worker_init.connect
def _listen_to_libvirt(**_: object) -> None:
    """libvirt's events (the job-completed statistics) need their loop running before the
    worker opens its libvirt connections (worker/libvirt_events.py); `drover worker` started
    it already, `celery -A config worker` starts it here."""
    start_event_loop()


@worker_ready.connect
def _start_housekeeping(sender: object, **_: object) -> None:
    """Heartbeat, leases and recovery start with the worker, whichever command started it."""
    hostname = getattr(sender, "hostname", "")
    if hostname:
        start_keeper(runtime_for_node(str(hostname)))


@worker_shutting_down.connect
def _drain(sender: object, how: str = "", **_: object) -> None:
    """A warm shutdown: this worker takes nothing new and says so (worker/keeper.py)."""
    if how == "Warm" and sender:
        begin_drain(str(sender).split("@", 1)[-1])


def _run_side_task(
    task: Task, name: str, fn: Callable[[Runtime, Job], None], job_id: object
) -> None:
    """A task outside the phase chain (rollback, post-copy switch), run in the job's context."""
    rt = _runtime(task)
    with _edge():
        try:
            job = rt.store.get(_checked_job_id(job_id))
        except JobNotFound:
            raise Dropped(f"no job {job_id}") from None
        with structlog.contextvars.bound_contextvars(**job_context(job, name)):
            if not verified(rt, job):
                raise Dropped("not signed")
            try:
                fn(rt, job)
            except PhaseFailed as exc:
                log.warning(f"{name}.refused", reason=exc.reason)
                raise


@app.task(bind=True, name=ROLLBACK_DESTINATION_TASK, throws=(PhaseFailed,))
def rollback_destination(self: Task, job_id: str) -> None:
    _run_side_task(self, "rollback", rollback_reconnecting, job_id)


@app.task(bind=True, name=POSTCOPY_TASK, throws=(PhaseFailed,))
def postcopy(self: Task, job_id: str) -> None:
    _run_control(self, start_postcopy, job_id)


def _run_control(task: Task, fn: Callable[[Runtime, Job], None], job_id: object) -> None:
    """`drover tune` / `force-complete` / `postcopy`: its events name the request (the task's
    id), which the producer waits for (its `policy.step`, or `control.refused` with why)."""
    with structlog.contextvars.bound_contextvars(request=str(task.request.id)):
        _run_side_task(task, "control", fn, job_id)


@app.task(bind=True, name=TUNE_TASK, throws=(PhaseFailed,))
def tune_migration(self: Task, job_id: str) -> None:
    request_id = str(self.request.id)  # the request beside it in Redis is its own
    _run_control(self, lambda rt, job: tune(rt, job, request_id), job_id)


@app.task(bind=True, name=FORCE_COMPLETE_TASK, throws=(PhaseFailed,))
def force_complete_migration(self: Task, job_id: str) -> None:
    _run_control(self, force_complete, job_id)


@app.task(bind=True, name=CANCEL_NOTICE_TASK)
def cancel_notice(self: Task, job_id: str) -> None:
    """An operator cancelled this job: this host keeps it (worker/cancel_notice.py)."""
    with _edge():
        note_cancel(_runtime(self), _checked_job_id(job_id))


@app.task(bind=True, name=ABORT_NOTICE_TASK)
def abort_notice(self: Task, job_id: str) -> None:
    """An operator asked to abort this job's running migration: this host keeps it, and the
    migration's monitor aborts it in libvirt (worker/cancel_notice.py)."""
    with _edge():
        note_abort(_runtime(self), _checked_job_id(job_id))


@app.task(bind=True, name=EVACUATE_TASK)
def evacuate(self: Task, evacuation_id: str) -> None:
    """Plan an evacuation of this host and queue its children (worker/evacuation.py)."""
    with _edge():
        try:
            evacuation.start(_runtime(self), _checked_job_id(evacuation_id))
        except JobNotFound:
            log.warning("message.rejected", reason=f"no evacuation {evacuation_id}")
            raise Dropped(f"no evacuation {evacuation_id}") from None
