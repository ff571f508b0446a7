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
from pydantic import ValidationError

from config.celery import host_queue, make_app
from config.events import CONTRACT_KEYS
from config.settings import ConfigError, Settings, load_settings
from jobs.model import Job
from jobs.phases import POSTCOPY_TASK
from jobs.spec import MigrationSpec, first_error
from jobs.states import JobState
from jobs.store import JobStore
from producer.workflow import migration_chain


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
            self.settings.redis_url, event_maxlen=self.settings.tunables.event_stream_maxlen
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
            self.store.append_event(job_id, self._event(job_id, spec, "job.queued"))
            migration_chain(self._app, job_id, spec).apply_async()
        except redis.RedisError as exc:
            raise BrokerUnavailable(
                f"cannot reach Redis at {redis_location(self.settings.redis_url)}: {exc}"
            ) from None
        except Exception as exc:  # kombu wraps connection errors in its own types
            raise BrokerUnavailable(
                f"cannot queue the job on {redis_location(self.settings.redis_url)}: {exc}"
            ) from None
        return job_id

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

    def start_postcopy(self, job_id: str) -> None:
        """Ask the source host to switch a running --postcopy migration to post-copy."""
        job = self.store.get(job_id)
        if not job.spec.postcopy:
            raise SubmitError(f"job {job_id} was not started with --postcopy")
        if job.state is not JobState.MIGRATING:
            raise SubmitError(
                f"job {job_id} is {job.state.value}; post-copy can start only while migrating"
            )
        self._app.send_task(POSTCOPY_TASK, args=(job_id,), queue=host_queue(job.spec.src))

    def job(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def jobs(self, limit: int = 50) -> list[Job]:
        return self.store.recent(limit)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is terminal; TimeoutError after `timeout` seconds.

        Waits on the job's event stream (a blocking read), so it returns as soon as the
        terminal event lands instead of on the next tick of a polling loop.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        block_s = self.settings.tunables.wait_block
        last = "0-0"
        while True:
            job = self.store.get(job_id)
            if job.terminal:
                return job
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout}s")
            block_ms = max(1, int(1000 * (block_s if left is None else min(left, block_s))))
            for eid, _ in self.store.read_events(job_id, after=last, block_ms=block_ms):
                last = eid

    def events(self, job_id: str, *, follow: bool = False) -> Iterator[dict[str, Any]]:
        """The job's events; with `follow`, keep yielding until the job is terminal."""
        self.store.get(job_id)  # JobNotFound for a wrong id, before any waiting
        if follow:
            yield from self.store.follow_events(job_id)
        else:
            for _, event in self.store.read_events(job_id):
                yield event
