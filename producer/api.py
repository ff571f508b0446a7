"""The Python API for scripts: submit a migration, wait for it, follow its events.

from producer.api import Drover
d = Drover()
job_id = d.submit(domain="web01", src="lab1", dst="lab2")
job = d.wait(job_id)
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import redis
from celery.canvas import Signature
from pydantic import ValidationError

from config.celery import host_queue, make_app
from config.events import job_event
from config.security import ensure_signing
from config.settings import ConfigError, Settings, load_settings
from jobs.abort import ABORT_REASON, TooLate, abort_job
from jobs.admission import Admission, inbound_gate, outbound_gate
from jobs.evacuation import (
    EVACUATION_KIND,
    EVACUATION_TERMINAL,
    Evacuation,
    EvacuationSpec,
    EvacuationState,
    EvacuationStore,
)
from jobs.follow import MS_PER_S, wait_for_end
from jobs.maintenance import Maintenance, reason_problem
from jobs.model import Job
from jobs.phases import EVACUATE_TASK, POSTCOPY_TASK, ROLLBACK_DESTINATION_TASK
from jobs.request_signing import signer_for, verifier_for
from jobs.spec import MigrationSpec, first_error
from jobs.states import TERMINAL, JobState
from jobs.store import JobNotFound, JobStore
from jobs.submission import DomainBusy, enqueue
from jobs.targets import migration_uri_problem
from jobs.workflow import migration_chain
from producer.outage import OutageRider

TERMINAL_NAMES = frozenset(s.value for s in TERMINAL)


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
    def __init__(
        self, settings: Settings | None = None, *, notice: Callable[[str], None] | None = None
    ) -> None:
        """`notice` gets the one-line announcements of a Redis outage met while following a
        job (the log's warnings by default; the command line prints them on stderr)."""
        self.settings = settings or load_settings()
        self.notice = notice or logging.getLogger("drover").warning
        self.store = JobStore.from_url(
            self.settings.redis_url,
            event_maxlen=self.settings.tunables.event_stream_maxlen,
            retry_for=self.settings.tunables.producer_redis_retry_for,
        )
        self._app = make_app(self.settings)
        self.signer = signer_for(self.settings.security)
        self.admission = Admission(self.store, verifier_for(self.settings.security))
        self.evacuations = EvacuationStore(self.store)
        self.maintenance = Maintenance(self.store.r)

    def spec(self, **request: Any) -> MigrationSpec:
        """Validate a request into a spec, or raise SubmitError with one line."""
        try:
            spec = MigrationSpec.model_validate(request)
        except ValidationError as exc:
            raise SubmitError(first_error(exc)) from None
        self._check_against_registry(spec)
        return spec

    def _check_against_registry(self, spec: MigrationSpec) -> None:
        """Both hosts in the registry, and a --migrate-uri only toward the destination's own
        migration addresses or socket directory (jobs/targets.py); SubmitError otherwise."""
        try:
            self.settings.host(spec.src)
            dst = self.settings.host(spec.dst)
        except ConfigError as exc:
            raise SubmitError(str(exc)) from None
        if spec.migrate_uri is not None:
            problem = migration_uri_problem(spec.migrate_uri, dst)
            if problem is not None:
                raise SubmitError(problem)

    def submit(self, spec: MigrationSpec | None = None, **request: Any) -> str:
        """Record the job and put it in line; it starts as soon as every limit has room.

        A spec built by the caller is checked against the registry here, as `spec()` does.
        """
        if spec is None:
            spec = self.spec(**request)
        else:
            self._check_against_registry(spec)
        with self._broker_errors():
            refusal = self.maintenance.refusal(spec.dst)
            if refusal is not None:
                raise SubmitError(refusal)
            try:
                job_id = enqueue(
                    self.store,
                    spec,
                    origin=producer_name(),
                    signer=self.signer,
                )
            except DomainBusy as exc:
                raise SubmitError(str(exc)) from None
        # The job is recorded and in line: whatever happens next, it will run. If starting it
        # here fails, every worker's admission tick (or recovery, once admitted) starts it.
        with contextlib.suppress(Exception):
            self.admit()
        return job_id

    def admit(self) -> list[str]:
        """Start every waiting job that fits under the limits now (workers do this too)."""
        return self.admission.admit_waiting(
            self.settings, lambda job_id, spec: self.send(migration_chain(self._app, job_id, spec))
        )

    @contextmanager
    def _broker_errors(self) -> Iterator[None]:
        """Redis or the broker out of reach: one line naming where, never the password."""
        try:
            yield
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

    def send(self, signature: Signature) -> None:
        """Publish a task (or a chain), signed with this fleet's key when signing is on."""
        ensure_signing(self._app, self.settings)
        signature.apply_async()

    def abort(self, job_id: str) -> str:
        """Stop a job or an evacuation; returns what happened, in one line.

        A queued job never starts, a running migration is aborted in libvirt; the guest stays
        where it was. An evacuation stops its queued children and aborts its running ones.
        """
        if self.store.kind(job_id) == EVACUATION_KIND:
            return self.abort_evacuation(job_id)
        try:
            return abort_job(self.store, job_id, by=producer_name(), rollback=self._rollback)
        except TooLate as exc:
            raise SubmitError(str(exc)) from None

    def _rollback(self, job: Job) -> None:
        self.send(
            self._app.signature(
                ROLLBACK_DESTINATION_TASK, args=(job.id,), queue=host_queue(job.spec.dst)
            )
        )

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

    def record(self, job_id: str) -> Job | Evacuation:
        """A migration job or an evacuation, whichever the id names."""
        if self.store.kind(job_id) == EVACUATION_KIND:
            return self.evacuations.get(job_id)
        return self.store.get(job_id)

    def jobs(self, limit: int = 50) -> list[Job | Evacuation]:
        """Newest first: migration jobs and evacuations."""
        found: list[Job | Evacuation] = []
        for job_id in self.store.recent_ids(limit):
            try:
                found.append(self.record(job_id))
            except JobNotFound:
                continue
        return found

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is terminal and its terminal event is in the stream.

        Waits on the job's event stream (a blocking read), so it returns as soon as the
        terminal event lands instead of on the next tick of a polling loop; a caller that
        reads the events afterwards finds the whole story. Rides out a Redis outage of up to
        tunables.wait_redis_outage (producer/outage.py).
        """
        ride = self._rider(job_id, timeout)

        def ended() -> tuple[bool, str]:
            job = ride(lambda: self.store.get(job_id))
            return job.terminal, job.state.value

        self._wait_for_end(job_id, ended, "job.state", TERMINAL_NAMES, timeout, ride)
        return ride(lambda: self.store.get(job_id))

    def wait_evacuation(self, evacuation_id: str, timeout: float | None = None) -> Evacuation:
        """Block until the evacuation has ended (drained, partial, planned, ...)."""
        ride = self._rider(evacuation_id, timeout)

        def ended() -> tuple[bool, str]:
            ev = ride(lambda: self.evacuations.get(evacuation_id))
            return ev.terminal, ev.state.value

        names = frozenset(s.value for s in EVACUATION_TERMINAL)
        self._wait_for_end(evacuation_id, ended, "evacuation.state", names, timeout, ride)
        return ride(lambda: self.evacuations.get(evacuation_id))

    def _rider(self, job_id: str, timeout: float | None) -> OutageRider:
        """Redis calls of one follower of `job_id`, riding out an outage (bounded by the
        follower's own `timeout` too)."""
        return OutageRider(
            redis_location(self.settings.redis_url),
            f"job {job_id}",
            self.settings.tunables.wait_redis_outage,
            self.notice,
            deadline=None if timeout is None else time.monotonic() + timeout,
            follow_again=f"drover events {job_id} --follow",
        )

    def _wait_for_end(
        self,
        job_id: str,
        ended: Callable[[], tuple[bool, str]],
        state_event: str,
        terminal_names: frozenset[str],
        timeout: float | None,
        ride: OutageRider,
    ) -> None:
        wait_for_end(
            self.store,
            job_id,
            lambda: ended()[0],
            end_event=lambda ev: (
                ev.get("event") == state_event and ev.get("state") in terminal_names
            ),
            state=lambda: ended()[1],
            block_ms=int(MS_PER_S * self.settings.tunables.wait_block),
            timeout=timeout,
            guard=ride,
        )

    # --- evacuations and maintenance ----------------------------------------------------------

    def evacuation_spec(self, **request: Any) -> EvacuationSpec:
        """Validate an evacuation request, or raise SubmitError with one line."""
        try:
            spec = EvacuationSpec.model_validate(request)
        except ValidationError as exc:
            raise SubmitError(first_error(exc)) from None
        try:
            for host in (spec.host, *spec.to):
                self.settings.host(host)
        except ConfigError as exc:
            raise SubmitError(str(exc)) from None
        return spec

    def evacuate(
        self, spec: EvacuationSpec | None = None, origin: str | None = None, **request: Any
    ) -> str:
        """Start emptying a host: its worker plans and queues one migration per domain.

        Unless it is a dry run the host is disabled first, so nothing new is placed on it
        while it drains; it stays disabled afterwards until `drover host enable`.
        """
        spec = spec if spec is not None else self.evacuation_spec(**request)
        origin = origin or producer_name()
        with self._broker_errors():
            if not self.store.alive(spec.host):
                raise SubmitError(
                    f"{spec.host}'s worker is not alive; it plans the evacuation of its host"
                )
            if not spec.dry_run:
                for other in self.evacuations.active_ids():
                    running = self.evacuations.get(other)
                    if running.spec.host == spec.host and not running.spec.dry_run:
                        raise SubmitError(
                            f"{spec.host} already has an active evacuation {other} "
                            f"({running.state.value})"
                        )
            evacuation_id = self.evacuations.create(spec, origin, signer=self.signer)
            if not spec.dry_run:
                self.maintenance.disable(spec.host, f"evacuation {evacuation_id}", by=origin)
            self.store.append_event(
                evacuation_id,
                job_event(
                    "evacuation.queued",
                    origin,
                    job_id=evacuation_id,
                    src=spec.host,
                    state="queued",
                    spec=spec.model_dump(mode="json"),
                ),
            )
            try:
                self.send(
                    self._app.signature(
                        EVACUATE_TASK, args=(evacuation_id,), queue=host_queue(spec.host)
                    )
                )
            except Exception as exc:
                self._undo_evacuation(evacuation_id, spec, f"could not be queued: {exc}")
                raise
        return evacuation_id

    def _undo_evacuation(self, evacuation_id: str, spec: EvacuationSpec, reason: str) -> None:
        """Best effort after a failed publish: end it `failed` (so no worker starts it later)
        and enable the host again if this evacuation is what disabled it."""
        with contextlib.suppress(Exception):
            self.evacuations.transition(evacuation_id, EvacuationState.FAILED, reason)
            entry = self.maintenance.disabled_entry(spec.host)
            if entry is not None and entry.reason == f"evacuation {evacuation_id}":
                self.maintenance.enable(spec.host)

    def evacuation(self, evacuation_id: str) -> Evacuation:
        return self.evacuations.get(evacuation_id)

    def abort_evacuation(self, evacuation_id: str) -> str:
        """Stop an evacuation: queued children never start, running ones are aborted."""
        ev = self.evacuations.get(evacuation_id)
        if ev.terminal:
            raise SubmitError(f"evacuation {evacuation_id} already {ev.state.value}")
        self.evacuations.request_abort(evacuation_id, ABORT_REASON)
        done = []
        for job_id in ev.children.values():
            try:
                done.append(
                    abort_job(self.store, job_id, by=producer_name(), rollback=self._rollback)
                )
            except TooLate:
                continue
        said = (
            f"evacuation {evacuation_id}: abort requested; {len(done)} of "
            f"{len(ev.children)} child jobs stopped or being aborted, the rest had ended"
        )
        if self.store.alive(ev.spec.host):
            return said  # its worker checks where every domain is, then ends it `cancelled`
        # Its host's worker is away and would be the one to end it: end it here once no
        # child is live any more (a migrating one waits for that worker's recovery).
        children = [
            self.store.get(j) for j in self.evacuations.get(evacuation_id).children.values()
        ]
        if any(not c.terminal for c in children):
            return f"{said}; a child is still live while {ev.spec.host}'s worker is away"
        reason = (
            f"{ABORT_REASON}; {ev.spec.host}'s worker is away, so where each domain is was "
            "not checked through libvirt"
        )
        moved, _ = self.evacuations.transition(evacuation_id, EvacuationState.CANCELLED, reason)
        if moved:
            self.store.append_event(
                evacuation_id,
                job_event(
                    "evacuation.state",
                    producer_name(),
                    job_id=evacuation_id,
                    src=ev.spec.host,
                    state=EvacuationState.CANCELLED.value,
                    reason=reason,
                ),
            )
        return f"evacuation {evacuation_id} cancelled ({reason})"

    def set_host_enabled(self, host: str, enabled: bool, reason: str | None = None) -> str:
        """Maintenance mode: a disabled host is never a destination."""
        try:
            self.settings.host(host)
        except ConfigError as exc:
            raise SubmitError(str(exc)) from None
        if enabled:
            was = self.maintenance.enable(host)
            return f"{host} enabled" if was else f"{host} was not disabled"
        problem = None if reason is None else reason_problem(reason)
        if problem is not None:
            raise SubmitError(problem)
        entry = self.maintenance.disable(host, reason or "maintenance", by=producer_name())
        return f"{host} disabled since {entry.since} ({entry.reason})"

    def hosts(self) -> list[dict[str, Any]]:
        """Each registry host: maintenance, worker liveness, and its worker's last report."""
        disabled = self.maintenance.disabled()
        rows = []
        for name in sorted(self.settings.hosts):
            report = self.store.host_report(name)
            entry = disabled.get(name)
            draining = self.store.draining(name)
            rows.append(
                {
                    "host": name,
                    "state": "disabled" if entry else "enabled",
                    "disabled_reason": entry.reason if entry else None,
                    "worker_alive": self.store.alive(name),
                    # A worker in warm shutdown: since when, and the jobs it still runs.
                    "draining": draining,
                    "config_error": report.get("config_error"),
                    "migrations_out": len(self.admission.holders(outbound_gate(name))),
                    "migrations_in": len(self.admission.holders(inbound_gate(name))),
                    "free_mib": report.get("free_mib"),
                    "running": report.get("running"),
                    "reported": report.get("ts"),
                }
            )
        return rows

    def events(
        self, job_id: str, *, follow: bool = False, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """The job's (or evacuation's) events; with `follow`, until it has ended (through a
        Redis outage of up to tunables.wait_redis_outage, as `wait`)."""
        ride = self._rider(job_id, timeout)
        # JobNotFound for a wrong id, before any waiting
        kind = ride(partial(self.store.kind, job_id)) if follow else self.store.kind(job_id)

        def ended() -> bool:
            if kind == EVACUATION_KIND:
                return self.evacuations.get(job_id).terminal
            return self.store.get(job_id).terminal

        if follow:
            yield from self.store.follow_events(job_id, ended, timeout=timeout, guard=ride)
        else:
            for _, event in self.store.read_events(job_id):
                yield event
