"""`Drover.tune`, `Drover.force_complete` and `Drover.start_postcopy`: ask the source worker
to act on a running migration, and wait for its answer.

Bad numbers and a job that is not migrating are refused here, before anything is sent. The
request goes to the source host's queue as a task (the tune's numbers beside it in Redis,
signed: jobs/control.py); the worker checks again, with libvirt, and answers in the job's
event stream with a `policy.step` (done) or `control.refused` (why not) naming the request
(the task's id), which is what this module waits for.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.canvas import Signature

from config.celery import host_queue
from config.settings import Settings
from jobs.control import (
    TUNE_OPTIONS,
    BadControlRequest,
    TuneRequest,
    not_migrating,
    postcopy_off,
    push_tune,
    tune_request,
)
from jobs.errors import ControlUnanswered, SubmitError
from jobs.follow import MS_PER_S
from jobs.model import Job
from jobs.phases import FORCE_COMPLETE_TASK, POSTCOPY_TASK, TUNE_TASK
from jobs.request_signing import RequestSigner
from jobs.store import JobStore

DONE_EVENT = "policy.step"
REFUSED_EVENT = "control.refused"


class ControlRequests:
    """What the API needs to send a control request and hear back."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        app: Celery,
        send: Callable[[Signature], None],
        by: str,
        signer: RequestSigner | None = None,
    ) -> None:
        self.settings, self.store, self.app, self.send, self.by = settings, store, app, send, by
        self.signer = signer  # signs a tune's numbers (jobs/control.py); None: signing off

    def tune(self, job_id: str, **values: int | None) -> str:
        """New limits for a running migration (None: leave it); one line saying what was set."""
        given = {k: v for k, v in values.items() if v is not None}
        try:
            request = tune_request(**given, by=self.by)
        except BadControlRequest as exc:
            raise SubmitError(str(exc)) from None
        job = self._migrating(job_id, "tune")
        problem = postcopy_off(job, request)
        if problem is not None:
            raise SubmitError(problem)
        return self._ask(
            job, TUNE_TASK, "tune", lambda task_id: self._push(job_id, task_id, request)
        )

    def force_complete(self, job_id: str) -> str:
        """Finish a running migration now (post-copy where allowed, else pause the guest)."""
        job = self._migrating(job_id, "force-complete")
        return self._ask(job, FORCE_COMPLETE_TASK, "force-complete", lambda _: None)

    def postcopy(self, job_id: str) -> str:
        """Switch a running migration to post-copy; the worker's answer, as for the others.
        The record's policy is looked at first only to refuse early: the worker decides."""
        job = self._migrating(job_id, "switch to post-copy")
        if job.policy is not None and not job.policy.values.allow_postcopy:
            raise SubmitError(f"job {job_id}'s policy {job.policy.name} does not allow post-copy")
        return self._ask(job, POSTCOPY_TASK, "post-copy", lambda _: None)

    def _migrating(self, job_id: str, what: str) -> Job:
        job = self.store.get(job_id)
        reason = not_migrating(job, what)
        if reason is not None:
            raise SubmitError(reason)
        return job

    def _push(self, job_id: str, task_id: str, request: TuneRequest) -> None:
        ttl_s = self.settings.tunables.message_ttl
        push_tune(self.store.r, job_id, task_id, request, ttl_s, self.signer)

    def _ask(self, job: Job, task: str, what: str, before: Callable[[str], None]) -> str:
        """Send the request and wait for the worker's answer; its line, or SubmitError with
        the worker's refusal, or ControlUnanswered when no answer came in time.

        The request is good for `control_reply_timeout` only (its signed envelope expires):
        a probe killed the source's worker, was told "no answer", and the restarted worker
        switched the guest to post-copy from the queue. One taken in time is waited for as
        long as a worker may take before it acts (the transfer's start, another control)."""
        after = self.store.newest_event_id(job.id)
        request_id = uuid.uuid4().hex
        before(request_id)
        src = job.spec.src
        tunables = self.settings.tunables
        valid_s = tunables.control_reply_timeout
        self.send(
            self.app.signature(
                task, args=(job.id,), queue=host_queue(src), task_id=request_id, expires=valid_s
            )
        )
        waited_s = valid_s + tunables.control_setup_wait + tunables.control_lock_wait
        deadline = time.monotonic() + waited_s
        block_ms = int(MS_PER_S * tunables.wait_block)
        while time.monotonic() < deadline:
            # Entries that are no event are passed over (jobs/streams.py), and read on from.
            batch = self.store.read_batch(job.id, after, block_ms=block_ms)
            after = batch.last or after
            for _, event in batch.events:
                if event.get("request") != request_id:
                    continue
                if event.get("event") == REFUSED_EVENT:
                    raise SubmitError(f"{what} refused by {src}: {event.get('reason')}")
                if event.get("event") == DONE_EVENT:
                    return done_line(job.id, what, event)
        raise ControlUnanswered(
            f"no answer from {src}'s worker to {what} of job {job.id} within {waited_s:g}s: "
            f"the request expired after {valid_s:g}s unless that worker took it before, and "
            f"then it may still be carried out (drover events {job.id} --follow)"
        )


def done_line(job_id: str, what: str, event: dict[str, Any]) -> str:
    """One line for a `policy.step` the worker made at the operator's request."""
    action = event.get("action")
    if action == "tune":
        figures = " ".join(f"{k}={event[k]}" for k in TUNE_OPTIONS if k in event)
        return f"job {job_id}: {figures}"
    if action == "postcopy":
        return f"job {job_id}: switched to post-copy ({event.get('reason')})"
    return f"job {job_id}: {action} ({event.get('reason')})"
