"""Starting, validating and aborting an evacuation: one service for every entry point.

`drover evacuate`, the Python API (producer/api.py) and a scheduled fire on the host's own
worker (worker/schedule_tasks.py) all go through `EvacuationService`, so each refuses with the
same words, disables the host once, and creates at most one active evacuation per host (the
check and the creation are one atomic step, jobs/evacuation.py). The caller hands in its store,
its Celery app and how it publishes (a producer signs, a worker's app already does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.canvas import Signature
from pydantic import ValidationError

from config.celery import host_queue
from config.events import job_event
from config.settings import ConfigError, Settings
from jobs.abort import ABORT_REASON, TooLate, abort_job, host_notifier, rollback_sender
from jobs.abort_request import sign_abort
from jobs.errors import SubmitError, broker_errors
from jobs.evacuation import (
    EvacuationBusy,
    EvacuationSpec,
    EvacuationState,
    EvacuationStore,
)
from jobs.maintenance import Maintenance
from jobs.phases import EVACUATE_TASK
from jobs.policy_choice import effective_policy, named_layers
from jobs.request_signing import RequestSigner
from jobs.spec import first_error
from jobs.store import JobNotFound, JobStore

# The `phase` of an evacuation's own events (docs/events.md), as its worker writes them.
EVACUATION_PHASE = "evacuation"
# The domain name of the child spec an evacuation's options are checked with (no domain is
# known before its worker plans): any valid name would do.
PROBE_DOMAIN = "any-domain"
# How often an abort lists the evacuation's children: once, then again for a child its worker
# queued while the first list was read (the worker checks the abort after each child it
# queues, so one more look finds it; a third is a margin).
ABORT_LOOKS = 3


def evacuation_reason(evacuation_id: str) -> str:
    """The maintenance reason of a host disabled by an evacuation."""
    return f"evacuation {evacuation_id}"


def validate_evacuation(settings: Settings, **request: Any) -> EvacuationSpec:
    """Validate an evacuation request against its rules and today's registry, or raise
    SubmitError with one line."""
    try:
        spec = EvacuationSpec.model_validate(request)
    except ValidationError as exc:
        raise SubmitError(first_error(exc)) from None
    try:
        for host in (spec.host, *spec.to):
            settings.host(host)
        check_child_policy(settings, spec)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None
    return spec


def check_child_policy(settings: Settings, spec: EvacuationSpec) -> None:
    """The policy a live child would run with, resolved as `drover migrate` resolves it
    (without the domain's metadata, read on the worker): ConfigError, one line, for an
    unknown name or a policy these options cannot use. The worker checks again at planning,
    each domain with its own metadata."""
    if spec.policy is not None:
        named_layers(settings, spec.policy, "--policy")  # an unknown name, whatever the hosts
    others = [h for h in (spec.to or sorted(settings.hosts)) if h != spec.host]
    if not others:
        return  # nowhere to go: the plan will say so
    try:
        child = spec.child(PROBE_DOMAIN, others[0], active=True, persistent=True, local_disks=True)
    except ValidationError as exc:
        raise ConfigError(first_error(exc)) from None
    effective_policy(settings, child)


@dataclass
class EvacuationService:
    """Evacuations as every entry point starts and stops them (see the module's doc)."""

    settings: Settings
    store: JobStore
    app: Celery
    send: Callable[[Signature], None]
    signer: RequestSigner | None
    records: EvacuationStore = field(init=False)
    maintenance: Maintenance = field(init=False)

    def __post_init__(self) -> None:
        self.records = EvacuationStore(self.store)
        self.maintenance = Maintenance(self.store.r)

    def validate(self, **request: Any) -> EvacuationSpec:
        """Validate an evacuation request, or raise SubmitError with one line."""
        return validate_evacuation(self.settings, **request)

    def start(self, spec: EvacuationSpec, origin: str) -> str:
        """Start emptying a host: its worker plans and queues one migration per domain.

        Unless it is a dry run the host is disabled here, once, so nothing new is placed on it
        while it drains; it stays disabled afterwards until `drover host enable`.
        """
        with broker_errors(self.settings.redis_url):
            if not self.store.alive(spec.host):
                raise SubmitError(
                    f"{spec.host}'s worker is not alive; it plans the evacuation of its host"
                )
            try:
                evacuation_id = self.records.create(spec, origin, signer=self.signer)
            except EvacuationBusy as exc:
                raise SubmitError(str(exc)) from None
            self._event(
                evacuation_id,
                "evacuation.queued",
                origin,
                src=spec.host,
                state="queued",
                spec=spec.model_dump(mode="json"),
            )
            if not spec.dry_run:
                reason = evacuation_reason(evacuation_id)
                self.maintenance.disable(spec.host, reason, by=origin)
                self._event(
                    evacuation_id,
                    "host.disabled",
                    origin,
                    src=spec.host,
                    phase=EVACUATION_PHASE,
                    reason=reason,
                )
            try:
                self.send(
                    self.app.signature(
                        EVACUATE_TASK, args=(evacuation_id,), queue=host_queue(spec.host)
                    )
                )
            except Exception as exc:
                self._undo(evacuation_id, spec, f"could not be queued: {exc}")
                raise
        return evacuation_id

    def _undo(self, evacuation_id: str, spec: EvacuationSpec, reason: str) -> None:
        """Best effort after a failed publish: end it `failed` (so no worker starts it later)
        and enable the host again if this evacuation is what disabled it."""
        with contextlib.suppress(Exception):
            self.records.transition(evacuation_id, EvacuationState.FAILED, reason)
            entry = self.maintenance.disabled_entry(spec.host)
            if entry is not None and entry.reason == evacuation_reason(evacuation_id):
                self.maintenance.enable(spec.host, self.signer, f"evacuation {evacuation_id}")

    def abort(self, evacuation_id: str, by: str) -> str:
        """Stop an evacuation: queued children never start, running ones are aborted."""
        ev = self.records.get(evacuation_id)
        if ev.terminal:
            raise SubmitError(f"evacuation {evacuation_id} already {ev.state.value}")
        signed = sign_abort(self.signer, evacuation_id, ABORT_REASON, by)
        self.records.request_abort(evacuation_id, ABORT_REASON, signed)
        rollback = rollback_sender(self.app, self.send)
        notify = host_notifier(self.app, self.send)
        # Found by their own records too: the children list may have been deleted in Redis.
        # Listed again after the aborts: a child its worker queued meanwhile is stopped (and
        # counted) here too, not only by that worker's own look at the abort.
        asked: set[str] = set()
        done, too_late = 0, 0
        for _ in range(ABORT_LOOKS):
            current = self.records.get(evacuation_id)
            fresh = [
                j for j in self.records.find_children(current).jobs.values() if j.id not in asked
            ]
            if not fresh:
                break
            for job in fresh:
                asked.add(job.id)
                try:
                    abort_job(
                        self.store,
                        job.id,
                        by=by,
                        rollback=rollback,
                        notify=notify,
                        signer=self.signer,
                    )
                    done += 1
                except TooLate as exc:  # ended, or finishing / in post-copy: it lands there
                    too_late += 0 if exc.ended else 1
                except JobNotFound:
                    continue
        said = abort_line(evacuation_id, len(asked), done, too_late)
        if self.store.alive(ev.spec.host):
            return said  # its worker checks where every domain is, then ends it `cancelled`
        # Its host's worker is away and would be the one to end it: end it here once no
        # child is live any more (a migrating one waits for that worker's recovery).
        current = self.records.get(evacuation_id)
        if any(not c.terminal for c in self.records.find_children(current).jobs.values()):
            return f"{said}; a child is still live while {ev.spec.host}'s worker is away"
        reason = (
            f"{ABORT_REASON}; {ev.spec.host}'s worker is away, so where each domain is was "
            "not checked through libvirt"
        )
        moved, _ = self.records.transition(evacuation_id, EvacuationState.CANCELLED, reason)
        if moved:
            self._event(
                evacuation_id,
                "evacuation.state",
                by,
                src=ev.spec.host,
                state=EvacuationState.CANCELLED.value,
                reason=reason,
            )
        return f"evacuation {evacuation_id} cancelled ({reason})"

    def _event(self, evacuation_id: str, name: str, by: str, **fields: Any) -> None:
        self.store.append_event(evacuation_id, job_event(name, by, job_id=evacuation_id, **fields))


def abort_line(evacuation_id: str, children: int, stopped: int, landing: int) -> str:
    """What an evacuation's abort did to its children, each counted once: stopped or being
    aborted, past the point of no return (finishing or in post-copy: they land on their
    destination), or ended before (probe: a finishing child was counted as ended)."""
    ended = children - stopped - landing
    parts = [f"{stopped} of {children} child jobs stopped or being aborted"]
    if landing:
        parts.append(
            f"{landing} too far along to stop (finishing or in post-copy: they complete on "
            "their destination)"
        )
    parts.append(f"{ended} had ended")
    return f"evacuation {evacuation_id}: abort requested; " + ", ".join(parts)
