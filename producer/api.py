"""The Python API for scripts: submit a migration, wait for it, follow its events.

from producer.api import Drover
d = Drover()
job_id = d.submit(domain="web01", src="lab1", dst="lab2")
job = d.wait(job_id)

An argument of the wrong type or out of the CLI's bounds is a BadArgument (a SubmitError); Redis
or the broker out of reach is a BrokerUnavailable from every method; each is one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from celery.canvas import Signature

from config.celery import make_app
from config.security import ensure_signing
from config.settings import Settings, load_settings
from jobs.abort import TooLate, abort_job, host_notifier, rollback_sender
from jobs.admission import Admission, lane_of
from jobs.dry_run import record_dry_run
from jobs.errors import BadArgument as BadArgument
from jobs.errors import BrokerUnavailable as BrokerUnavailable
from jobs.errors import SubmitError as SubmitError
from jobs.errors import redis_location as redis_location
from jobs.errors import reporting_outages, require, require_id, require_seconds, spec_or_request
from jobs.maintenance import Maintenance
from jobs.model import Job
from jobs.quota import QuotaFull
from jobs.request_signing import RequestSigner, signer_for, verifier_for
from jobs.spec import MigrationSpec
from jobs.states import EVACUATION_KIND, TERMINAL
from jobs.store import JobStore
from jobs.submission import DomainBusy, enqueue
from jobs.validation import migration_spec
from jobs.workflow import migration_chain
from producer.hosts import host_rows, set_host_enabled
from producer.hosts import producer_name as producer_name
from producer.jobs_list import api_listing, list_jobs
from producer.waiting import End, record_events, wait_record

if TYPE_CHECKING:  # made on first use below: a migration needs none (~10 ms of imports)
    from celery import Celery

    from jobs.evacuation import Evacuation, EvacuationSpec, EvacuationStore
    from jobs.evacuations import EvacuationService
    from producer.control import ControlRequests

TERMINAL_NAMES = frozenset(s.value for s in TERMINAL)
R = TypeVar("R", "Job", "Evacuation")


@reporting_outages
class Drover:
    def __init__(
        self, settings: Settings | None = None, *, notice: Callable[[str], None] | None = None
    ) -> None:
        """`notice` gets one-line announcements: a Redis outage met while following a job, a
        job recorded whose start here failed (the log's warnings by default; the command line
        prints them on stderr)."""
        require("settings", settings, Settings, type(None))
        if notice is not None and not callable(notice):
            raise BadArgument(f"notice must be callable or None, not {type(notice).__name__}")
        self.settings = settings or load_settings()
        self.notice = notice or logging.getLogger("drover").warning
        self.store = JobStore.from_settings(
            self.settings, retry_for=self.settings.tunables.producer_redis_retry_for
        )
        self.maintenance = Maintenance(self.store.r)

    # On first use: `drover job`/`events`/`wait` never send, sign or admit (each loads the key).
    @cached_property
    def _app(self) -> Celery:
        return make_app(self.settings)

    @cached_property
    def signer(self) -> RequestSigner | None:
        _ = self.settings.security.signing and self._app  # its setup checks the key, once
        return signer_for(self.settings.security)

    @cached_property
    def admission(self) -> Admission:
        return Admission(self.store, verifier_for(self.settings.security))

    @cached_property
    def evacuations(self) -> EvacuationStore:
        from jobs.evacuation import EvacuationStore

        return EvacuationStore(self.store)

    @cached_property
    def evacuations_service(self) -> EvacuationService:
        from jobs.evacuations import EvacuationService

        return EvacuationService(self.settings, self.store, self._app, self.send, self.signer)

    @cached_property
    def _control(self) -> ControlRequests:
        from producer.control import ControlRequests

        return ControlRequests(
            self.settings, self.store, self._app, self.send, producer_name(), self.signer
        )

    def spec(self, **request: Any) -> MigrationSpec:
        """Validate a request into a spec, or raise SubmitError with one line."""
        return migration_spec(self.settings, request)

    def submit(self, spec: MigrationSpec | None = None, **request: Any) -> str:
        """Record the job and put it in line; it starts as soon as every limit has room.

        A spec or keywords, not both; a spec built by the caller is validated again, from its
        fields, and checked against the registry, as `spec()` does.
        """
        spec = spec_or_request(spec, request, MigrationSpec, self.spec)
        refusal = self.maintenance.refusal(spec.dst)
        if refusal is not None:
            raise SubmitError(refusal)
        if spec.dry_run:  # the checks only: no lane, slot, lease or reservation
            job_id = record_dry_run(self.store, spec, origin=producer_name(), signer=self.signer)
            self._start(job_id, spec)
            return job_id
        try:
            job_id = enqueue(
                self.store,
                spec,
                origin=producer_name(),
                signer=self.signer,
                max_waiting=self.settings.cluster.max_waiting_per_producer,
            )
        except (DomainBusy, QuotaFull) as exc:
            raise SubmitError(str(exc)) from None
        # The job is recorded and in line: whatever happens next, it will run. If starting it
        # here fails, every worker's admission tick (or recovery, once admitted) starts it.
        # Only this job's lane: the rest of the line is the workers' (a pass on each tick and
        # whenever a job ends), so a submit costs the same however long the line is.
        try:
            self.admission.admit_lane(self.settings, self._start, lane_of(spec, None))
        except Exception as exc:  # said, never raised: the job is in line and will start
            self.notice(
                f"job {job_id} is in line; starting it here failed ({exc}); "
                "a worker's admission tick starts it"
            )
        return job_id

    def admit(self) -> list[str]:
        """Start every waiting job that fits under the limits now, looking at every lane's
        head (the workers' safety pass; their usual pass looks only at what can move)."""
        return self.admission.safety_pass(self.settings, self._start)

    def _start(self, job_id: str, spec: MigrationSpec) -> None:
        self.send(migration_chain(self._app, job_id, spec))

    def send(self, signature: Signature) -> None:
        """Publish a task (or a chain), signed with this fleet's key when signing is on."""
        ensure_signing(self._app, self.settings)
        signature.apply_async()

    def abort(self, job_id: str) -> str:
        """Stop a job or an evacuation; returns what happened, in one line. A queued job
        never starts, a running migration is aborted in libvirt; the guest stays where it was.
        An evacuation stops its queued children and aborts its running ones."""
        if self.store.kind(require_id(job_id)) == EVACUATION_KIND:
            return self.abort_evacuation(job_id)
        try:
            rollback = rollback_sender(self._app, self.send)
            notify = host_notifier(self._app, self.send)
            return abort_job(
                self.store,
                job_id,
                by=producer_name(),
                rollback=rollback,
                notify=notify,
                signer=self.signer,
            )
        except TooLate as exc:
            raise SubmitError(str(exc)) from None

    def start_postcopy(self, job_id: str) -> str:
        """Switch a running migration to post-copy (its policy allowing); one line once the
        source's worker made the switch, SubmitError with its refusal, TimeoutError when it
        did not answer in time."""
        return self._control.postcopy(require_id(job_id))

    def tune(
        self,
        job_id: str,
        *,
        bandwidth_mib: int | None = None,
        postcopy_bandwidth_mib: int | None = None,
        max_downtime_ms: int | None = None,
    ) -> str:
        """New limits for a running migration (migrateSetMaxSpeed/-Downtime); one line.
        Each an int (or None: left as it is); the bounds are `drover tune`'s."""
        values = {
            "bandwidth_mib": bandwidth_mib,
            "postcopy_bandwidth_mib": postcopy_bandwidth_mib,
            "max_downtime_ms": max_downtime_ms,
        }
        for name, value in values.items():
            require(name, value, int, type(None))
        return self._control.tune(require_id(job_id), **values)

    def force_complete(self, job_id: str) -> str:
        """Post-copy where the policy allows it, else pause the guest until it arrives."""
        return self._control.force_complete(require_id(job_id))

    def job(self, job_id: str) -> Job:
        return self.store.get(require_id(job_id))

    def record(self, job_id: str) -> Job | Evacuation:
        """A migration job or an evacuation, whichever the id names."""
        if self.store.kind(require_id(job_id)) == EVACUATION_KIND:
            return self.evacuations.get(job_id)
        return self.store.get(job_id)

    def jobs(self, limit: int = 50, **filters: Any) -> list[Job | Evacuation]:
        """Newest first, at most `limit` (jobs_list.MIN_LIMIT..MAX_LIMIT, as `drover jobs`):
        migration jobs and evacuations; `states` (a list of names), `host` and `since` (30m,
        2h, 7d or an ISO time) filter them (producer/jobs_list.py), SubmitError if bad."""
        return list_jobs(self.settings, api_listing(self.settings, limit, filters), limit)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is terminal and its terminal event is in the stream.

        Waits on the job's event stream (a blocking read), so it returns as soon as the
        terminal event lands instead of on the next tick of a polling loop; a caller that
        reads the events afterwards finds the whole story. Rides out a Redis outage of up to
        tunables.wait_redis_outage (producer/outage.py). `timeout`: seconds, above 0.
        """
        return self._wait(job_id, timeout, self.store.get, ("job.state", TERMINAL_NAMES))

    def wait_evacuation(self, evacuation_id: str, timeout: float | None = None) -> Evacuation:
        """Block until the evacuation has ended (drained, partial, planned, ...)."""
        from jobs.evacuation import EVACUATION_TERMINAL as ENDS

        end = ("evacuation.state", frozenset(s.value for s in ENDS))
        return self._wait(evacuation_id, timeout, self.evacuations.get, end)

    def _wait(self, rid: str, timeout: float | None, get: Callable[[str], R], end: End) -> R:
        """Until the record ends and `end` (its state event, terminal states) is on its stream."""
        return wait_record(
            self.store, self.settings, self.notice, require_id(rid), timeout, get, end
        )

    def evacuation_spec(self, **request: Any) -> EvacuationSpec:
        """Validate an evacuation request, or raise SubmitError with one line."""
        return self.evacuations_service.validate(**request)

    def evacuate(
        self, spec: EvacuationSpec | None = None, origin: str | None = None, **request: Any
    ) -> str:
        """Start emptying a host (jobs/evacuations.py): it is disabled first, unless a dry
        run, and stays disabled afterwards until `drover host enable`. A spec or keywords,
        not both; a spec is validated again from its fields, as `evacuation_spec()` does."""
        from jobs.evacuation import EvacuationSpec

        require("origin", origin, str, type(None))
        spec = spec_or_request(spec, request, EvacuationSpec, self.evacuation_spec)
        return self.evacuations_service.start(spec, origin or producer_name())

    def evacuation(self, evacuation_id: str) -> Evacuation:
        return self.evacuations.get(require_id(evacuation_id))

    def abort_evacuation(self, evacuation_id: str) -> str:
        """Stop an evacuation: queued children never start, running ones are aborted."""
        return self.evacuations_service.abort(require_id(evacuation_id), by=producer_name())

    def set_host_enabled(self, host: str, enabled: bool, reason: str | None = None) -> str:
        """Maintenance mode: a disabled host is never a destination; `reason` only with
        disabling (as `drover host disable --reason`)."""
        require("host", host, str)
        require("enabled", enabled, bool)
        require("reason", reason, str, type(None))
        if enabled and reason is not None:
            raise BadArgument("a reason goes only with disabling a host (enabled=False)")
        return set_host_enabled(self.settings, self.maintenance, host, enabled, reason)

    def hosts(self) -> list[dict[str, Any]]:
        """Each registry host: maintenance, worker liveness, and its worker's last report."""
        return host_rows(self.settings, self.store, self.maintenance, self.admission)

    def events(
        self, job_id: str, *, follow: bool = False, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """The job's (or evacuation's) events; with `follow`, until it has ended (through a
        Redis outage of up to tunables.wait_redis_outage, as `wait`), or `timeout` seconds."""
        require("follow", follow, bool)
        require_seconds("timeout", timeout)
        if timeout is not None and not follow:
            raise BadArgument("timeout applies only with follow=True")
        rid, note = require_id(job_id), self.notice
        return record_events(self.store, self.settings, note, self._ended, rid, follow, timeout)

    def _ended(self, kind: str, rid: str) -> bool:
        record = self.evacuations.get(rid) if kind == EVACUATION_KIND else self.store.get(rid)
        return record.terminal
