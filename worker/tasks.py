"""The Celery tasks: one per phase, each a thin shell around worker/phases.py.

Every task takes only a job id; everything else is read back from the job store and parsed
again, so a message carries nothing the worker would have to trust.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import structlog
from celery import Task
from celery.exceptions import Ignore
from celery.signals import worker_init, worker_ready, worker_shutting_down

from config.celery import app
from config.events import get_logger
from config.settings import current
from jobs.model import Job
from jobs.phases import (
    EVACUATE_TASK,
    POSTCOPY_TASK,
    ROLLBACK_DESTINATION_TASK,
    Phase,
    task_name,
)
from jobs.store import JobNotFound
from worker import evacuation, phases
from worker.keeper import begin_drain, start_keeper
from worker.main import WorkerStartError, check_security
from worker.phase_scope import PhaseFailed, PhaseFn, RetryPhase, execute_phase, verified
from worker.runtime import Runtime, runtime_for_node

log = get_logger()
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{12}$")


def _runtime(task: Task) -> Runtime:
    return runtime_for_node(str(task.request.hostname))


def _checked_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
        log.warning("message.rejected", reason="malformed job id", value=repr(job_id)[:80])
        raise Ignore()
    return job_id


def _run(task: Task, phase: Phase, fn: PhaseFn, job_id: object) -> str:
    checked = _checked_job_id(job_id)
    rt = _runtime(task)
    try:
        execute_phase(rt, checked, phase, fn, attempt=task.request.retries)
    except RetryPhase as exc:
        # No kwargs: the message's envelope is its own; the retry gets a fresh one as it is
        # published (config/celery.py), and the task itself takes only the job id.
        raise task.retry(
            kwargs={}, countdown=rt.settings.tunables.retry_delay, max_retries=None
        ) from exc
    return checked


@app.task(bind=True, name=task_name(Phase.SOURCE_PREFLIGHT), throws=(PhaseFailed,))
def source_preflight(self: Task, job_id: str) -> str:
    return _run(self, Phase.SOURCE_PREFLIGHT, phases.source_preflight, job_id)


@app.task(bind=True, name=task_name(Phase.DESTINATION_PREPARE), throws=(PhaseFailed,))
def destination_prepare(self: Task, job_id: str) -> str:
    return _run(self, Phase.DESTINATION_PREPARE, phases.destination_prepare, job_id)


@app.task(bind=True, name=task_name(Phase.PERFORM), throws=(PhaseFailed,))
def perform(self: Task, job_id: str) -> str:
    return _run(self, Phase.PERFORM, phases.perform, job_id)


@app.task(bind=True, name=task_name(Phase.FINISH), throws=(PhaseFailed,))
def finish(self: Task, job_id: str) -> str:
    return _run(self, Phase.FINISH, phases.finish, job_id)


@app.task(bind=True, name=task_name(Phase.CONFIRM), throws=(PhaseFailed,))
def confirm(self: Task, job_id: str) -> str:
    return _run(self, Phase.CONFIRM, phases.confirm, job_id)


@worker_init.connect
def _refuse_insecure_start(**_: object) -> None:
    """`celery -A config worker` too refuses to run unsigned unless the config says so."""
    try:
        check_security(current())
    except WorkerStartError as exc:
        raise SystemExit(f"drover: {exc}") from None


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
    try:
        job = rt.store.get(_checked_job_id(job_id))
    except JobNotFound:
        raise Ignore() from None
    context = {
        "job_id": job.id,
        "domain": job.spec.domain,
        "src": job.spec.src,
        "dst": job.spec.dst,
        "phase": name,
    }
    with structlog.contextvars.bound_contextvars(**context):
        if not verified(rt, job):
            raise Ignore()
        try:
            fn(rt, job)
        except PhaseFailed as exc:
            log.warning(f"{name}.refused", reason=exc.reason)
            raise


@app.task(bind=True, name=ROLLBACK_DESTINATION_TASK)
def rollback_destination(self: Task, job_id: str) -> None:
    _run_side_task(self, "rollback", phases.rollback_reconnecting, job_id)


@app.task(bind=True, name=POSTCOPY_TASK, throws=(PhaseFailed,))
def postcopy(self: Task, job_id: str) -> None:
    _run_side_task(self, "postcopy", phases.start_postcopy, job_id)


@app.task(bind=True, name=EVACUATE_TASK)
def evacuate(self: Task, evacuation_id: str) -> None:
    """Plan an evacuation of this host and queue its children (worker/evacuation.py)."""
    try:
        evacuation.start(_runtime(self), _checked_job_id(evacuation_id))
    except JobNotFound:
        log.warning("message.rejected", reason=f"no evacuation {evacuation_id}")
        raise Ignore() from None
