"""perform (source): libvirt migrates the guest, watched every interval; and the operator's
switch of a running migration to post-copy (`drover postcopy`)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from libvirt import virDomain

from config.events import get_logger
from jobs.maintenance import Maintenance
from jobs.model import Job
from jobs.phases import Phase
from jobs.prepared_receipt import check_prepared
from jobs.request_signing import SECURITY_REASON, RequestRefused, verifier_for
from jobs.states import JobState
from worker.cancel_notice import flagged_abort
from worker.completion import Landing, landing
from worker.compression_support import unsupported
from worker.domain_xml_check import checked_xml
from worker.job_end import advance
from worker.ledger import PhaseMark
from worker.libvirt_events import CompletionWatch
from worker.libvirt_host import LibvirtError
from worker.migration_call import build_call, invoke
from worker.migration_carried_on import second_look
from worker.migration_limits import sending
from worker.migration_watch import watch_migration
from worker.phase_destination import handoff_or_fail
from worker.phase_errors import HandedOver, PhaseCancelled, PhaseFailed
from worker.phase_source import ensure_running_on_source, job_domain, offline_of_running
from worker.policy_source import resolve_and_record
from worker.postcopy_recovery import recover_failed_postcopy
from worker.runtime import Runtime

log = get_logger()
MS_PER_S = 1000


@dataclass
class CallOutcome:
    """How the migration call returned: whether it raised, and its error."""

    failed: bool = False
    error: str | None = None


# What a call that has not returned counts as: a failure, until the call says otherwise.
NOT_RETURNED = "the migration call never returned"


def call_outcome(make_call: Callable[[], None]) -> CallOutcome:
    """Make the migration call; how it returned. Whatever it raises is a failure with its
    message (libvirt's error, a destination that could not be opened, a refused URI, a bug),
    never a migration that went through: what happened to the guest is then read from
    libvirt (`ensure_running_on_source`)."""
    try:
        make_call()
    except LibvirtError as exc:
        return CallOutcome(True, exc.get_error_message() or str(exc))
    except Exception as exc:
        return CallOutcome(True, str(exc) or type(exc).__name__)
    return CallOutcome()


def perform(rt: Runtime, job: Job) -> JobState | None:
    spec = job.spec
    if spec.dry_run:  # the chain of a dry run ends at prepare; a forged message still stops
        raise PhaseFailed("a dry run never migrates; nothing moved")
    advance(rt, job, JobState.MIGRATING)
    dom = job_domain(rt, job, spec.domain)
    if dom is None or (not spec.offline and not dom.isActive()):
        raise PhaseFailed(f"{spec.domain} is no longer running on {spec.src}")
    # Started since preflight looked (an evacuation's guest planned shut off): again here.
    running_refusal = offline_of_running(job, spec.offline and bool(dom.isActive()))
    if running_refusal is not None:
        raise PhaseFailed(running_refusal)
    aborted = flagged_abort(rt, rt.store, job.id)
    if aborted:
        raise PhaseCancelled(f"{aborted} before the migration started; nothing moved")
    uuid = dom.UUIDString()
    prepared_or_fail(rt, job, uuid)
    with sending(rt, job, uuid):  # this host's own max_outbound
        return _migrate(rt, job, dom)


def prepared_or_fail(rt: Runtime, job: Job, uuid: str) -> None:
    """The destination's signed receipt that it prepared this job for this guest, or the job
    fails (`security.rejected`), nothing moved: a job written `prepared` by hand, its prepare
    never run there, is not migrated (jobs/prepared_receipt.py)."""
    try:
        verifier = verifier_for(rt.settings.security)
        check_prepared(verifier, job.prepared, job.id, job.spec.dst, uuid)
    except RequestRefused as exc:
        reason = f"{SECURITY_REASON}: {exc}"
        log.error("security.rejected", reason=reason)
        raise PhaseFailed(f"{reason}; nothing moved") from None


def _migrate(rt: Runtime, job: Job, dom: virDomain) -> JobState | None:
    """The migration itself, from the last checks before libvirt moves the guest."""
    spec = job.spec
    # Prepare refused a host in maintenance; one disabled since (another evacuation of it)
    # must not receive the guest either: this is the last moment before libvirt moves it.
    refusal = Maintenance(rt.store.r).refusal(spec.dst)
    if refusal is not None:
        raise PhaseFailed(f"{refusal}; it went into maintenance after prepare, nothing moved")
    checked_xml(spec, dom, rt.settings.host(spec.dst).storage_dirs)  # where it is used
    policy = resolve_and_record(rt, job, dom)
    call = build_call(spec, handoff_or_fail(rt, spec), policy.values)
    lacking = unsupported(call.params, rt.libvirt.conn.getLibVersion(), rt.host)
    if lacking is not None:  # libvirt would refuse it only after the destination prepared
        raise PhaseFailed(lacking)
    log.info("migration.started", call=call.describe())
    finished = threading.Event()
    outcome = CallOutcome(failed=True, error=NOT_RETURNED)
    # libvirt's job-completed event (downtime, final figures) for the success path below.
    completion = None if spec.offline else CompletionWatch(dom)

    def migrate() -> None:
        try:
            done = call_outcome(lambda: invoke(dom, call, rt.libvirt.reach))
            outcome.failed, outcome.error = done.failed, done.error
        finally:
            if completion is not None and outcome.failed:
                completion.close()  # a failed migration completes nothing
            finished.set()

    started = time.monotonic()
    worker = threading.Thread(target=migrate, name=f"migrate-{job.id}", daemon=True)
    worker.start()
    cancel_reason = abort_reason = last = None
    if not spec.offline:  # an offline migration has no job statistics to sample
        told = completion if completion is not None and completion.registered else None
        seen = watch_migration(rt, job, dom, finished, policy=policy.values, events=told)
        if seen.handed_over is not None:
            if completion is not None:
                completion.close()  # this worker no longer follows the migration
            raise HandedOver(seen.handed_over)
        cancel_reason, abort_reason, last = seen.cancel_reason, seen.abort_reason, seen.last
    worker.join()
    if outcome.failed and not spec.offline:  # libvirt's verdict, not the call's error
        look = second_look(rt, job, policy.values, outcome.error)
        if look.seen is not None:
            if look.seen.handed_over is not None:
                raise HandedOver(look.seen.handed_over)
            cancel_reason = cancel_reason or look.seen.cancel_reason
            abort_reason = abort_reason or look.seen.abort_reason
            last = look.seen.last or last
        if look.landed:
            outcome.failed, outcome.error = False, None
            completion = None  # its figures: the destination's (this watch was closed)
    migration_ms = round((time.monotonic() - started) * MS_PER_S, 1)
    if outcome.failed and not recover_failed_postcopy(rt, job, call, outcome.error):
        # Not a post-copy (libvirt shows none): the guest is still on the source.
        where = ensure_running_on_source(rt, job) if not spec.offline else "nothing moved"
        _note_failed(rt, job)
        if cancel_reason:
            raise PhaseCancelled(f"{cancel_reason}: migration aborted; {where}")
        why = abort_reason or outcome.error
        raise PhaseFailed(f"migration to {spec.dst} failed: {why}; {where}")
    fields = last.as_event_fields() if last else {}
    landed = Landing() if spec.offline else landing(rt, job, completion)
    result = {"migration_ms": migration_ms, "last_progress": fields}
    rt.store.update(job.id, result=result | landed.result_fields())
    log.info("migration.completed", migration_ms=migration_ms, **landed.event_fields())
    return None


def _note_failed(rt: Runtime, job: Job) -> None:
    """This host's word that the job's migration failed with the guest still here, for
    recovery to go by whatever the record says later (worker/ledger_word.py). A ledger that
    cannot be written leaves it unsaid: the job's failure is said all the same."""
    with contextlib.suppress(sqlite3.Error):
        rt.ledger.mark(job.id, Phase.PERFORM.value, PhaseMark.FAILED)
