"""The Python API for scripts: submit a migration, wait for it, follow its events.

from producer.api import Drover
d = Drover()
job_id = d.submit(domain="web01", src="lab1", dst="lab2")
job = d.wait(job_id)
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import redis
from celery.canvas import Signature
from pydantic import ValidationError

from config.celery import host_queue, make_app
from config.events import CONTRACT_KEYS
from config.security import ensure_signing
from config.settings import ConfigError, Settings, load_settings
from jobs.model import Job
from jobs.phases import POSTCOPY_TASK, ROLLBACK_DESTINATION_TASK
from jobs.spec import MigrationSpec, first_error
from jobs.states import TERMINAL, JobState
from jobs.store import JobStore, domain_lock_key
from jobs.workflow import migration_chain

ABORT_REASON = "aborted by operator"
TERMINAL_NAMES = frozenset(s.value for s in TERMINAL)
# How long wait() gives a terminal job's last event to reach the stream.
TERMINAL_EVENT_GRACE_S = 5.0


class SubmitError(Exception):
    """The request was refused before anything was queued; the message is one line."""


class BrokerUnavailable(Exception):
    pass


def redis_location(url: str) -> str:
    """host:port of a Redis URL, never its password."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}"


def producer_name() -> str:
    return f"producer@{socket.gethostname()}"


class Drover:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self.store = JobStore.from_url(
            self.settings.redis_url,
            event_maxlen=self.settings.tunables.event_stream_maxlen,
            retry_for=self.settings.tunables.producer_redis_retry_for,
        )
        self._app = make_app(self.settings)

    def spec(self, **request: Any) -> MigrationSpec:
        """Validate a request into a spec, or raise SubmitError with one line."""
        try:
            spec = MigrationSpec.model_validate(request)
        except ValidationError as exc:
            raise SubmitError(first_error(exc)) from None
        try:
            self.settings.host(spec.src)
            self.settings.host(spec.dst)
        except ConfigError as exc:
            raise SubmitError(str(exc)) from None
        return spec

    def submit(self, spec: MigrationSpec | None = None, **request: Any) -> str:
        """Record the job and queue its first phase; return the job id."""
        spec = spec if spec is not None else self.spec(**request)
        try:
            job_id = self.store.create(spec, host=producer_name())
            lease = self.settings.tunables.domain_lease
            holder = self.store.take_lease(domain_lock_key("name", spec.domain), job_id, lease)
            if holder is not None:
                self.store.discard(job_id)
                state = self.store.state(holder).value
                raise SubmitError(f"{spec.domain} already has an active job {holder} ({state})")
            self.store.append_event(job_id, self._event(job_id, spec, "job.queued"))
            self.send(migration_chain(self._app, job_id, spec))
        except SubmitError:
            raise
        except redis.RedisError as exc:
            raise BrokerUnavailable(
                f"cannot reach Redis at {redis_location(self.settings.redis_url)}: {exc}"
            ) from None
        except Exception as exc:  # kombu wraps connection errors in its own types
            raise BrokerUnavailable(
                f"cannot queue the job on {redis_location(self.settings.redis_url)}: {exc}"
            ) from None
        return job_id

    def send(self, signature: Signature) -> None:
        """Publish a task (or a chain), signed with this fleet's key when signing is on."""
        ensure_signing(self._app, self.settings)
        signature.apply_async()

    @staticmethod
    def _event(job_id: str, spec: MigrationSpec, name: str) -> dict[str, Any]:
        event: dict[str, Any] = dict.fromkeys(CONTRACT_KEYS)
        event.update(
            ts=datetime.now(UTC).isoformat(),
            event=name,
            job_id=job_id,
            domain=spec.domain,
            src=spec.src,
            dst=spec.dst,
            host=producer_name(),
            state=JobState.QUEUED.value,
            spec=spec.model_dump(mode="json"),
        )
        return event

    def abort(self, job_id: str) -> str:
        """Stop a job: a queued one never starts; a running migration is aborted in libvirt.

        Returns what happened, in one line. The guest stays where it was in every case.
        """
        job = self.store.get(job_id)
        if job.terminal:
            raise SubmitError(f"job {job_id} already {job.state.value}; nothing to abort")
        if job.state is JobState.FINISHING:
            raise SubmitError(
                f"job {job_id} is finishing: {job.spec.domain} already runs on {job.spec.dst}"
            )
        self.store.request_abort(job_id, ABORT_REASON)
        if job.state is not JobState.MIGRATING:
            moved, previous = self.store.transition(
                job_id, JobState.CANCELLED, host=producer_name(), reason=ABORT_REASON
            )
            if moved:
                event = self._event(job_id, job.spec, "job.state")
                self.store.append_event(
                    job_id, event | {"state": "cancelled", "reason": ABORT_REASON}
                )
                if JobState(previous or "queued") is not JobState.QUEUED:
                    self.send(
                        self._app.signature(
                            ROLLBACK_DESTINATION_TASK,
                            args=(job_id,),
                            queue=host_queue(job.spec.dst),
                        )
                    )
                return f"job {job_id} cancelled ({previous.value if previous else 'queued'})"
        return f"abort requested: {job.spec.src} aborts the running migration of {job.spec.domain}"

    def start_postcopy(self, job_id: str) -> None:
        """Ask the source host to switch a running --postcopy migration to post-copy."""
        job = self.store.get(job_id)
        if not job.spec.postcopy:
            raise SubmitError(f"job {job_id} was not started with --postcopy")
        if job.state is not JobState.MIGRATING:
            raise SubmitError(
                f"job {job_id} is {job.state.value}; post-copy can start only while migrating"
            )
        self.send(
            self._app.signature(POSTCOPY_TASK, args=(job_id,), queue=host_queue(job.spec.src))
        )

    def job(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def jobs(self, limit: int = 50) -> list[Job]:
        return self.store.recent(limit)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is terminal and its terminal event is in the stream.

        Waits on the job's event stream (a blocking read), so it returns as soon as the
        terminal event lands instead of on the next tick of a polling loop; a caller that
        reads the events afterwards finds the whole story.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        block_s = self.settings.tunables.wait_block
        last, seen_terminal_event = "0-0", False
        grace_until: float | None = None
        while True:
            job = self.store.get(job_id)
            if job.terminal:
                grace_until = grace_until or time.monotonic() + TERMINAL_EVENT_GRACE_S
                # Past the grace the worker could not write its last event; the record rules.
                if seen_terminal_event or time.monotonic() > grace_until:
                    return job
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0 and not job.terminal:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout}s")
            if left is not None:
                left = max(left, 0.05)
            block_ms = max(1, int(1000 * (block_s if left is None else min(left, block_s))))
            for eid, event in self.store.read_events(job_id, after=last, block_ms=block_ms):
                last = eid
                if event.get("event") == "job.state" and event.get("state") in TERMINAL_NAMES:
                    seen_terminal_event = True

    def events(self, job_id: str, *, follow: bool = False) -> Iterator[dict[str, Any]]:
        """The job's events; with `follow`, keep yielding until the job is terminal."""
        self.store.get(job_id)  # JobNotFound for a wrong id, before any waiting
        if follow:
            yield from self.store.follow_events(job_id)
        else:
            for _, event in self.store.read_events(job_id):
                yield event
