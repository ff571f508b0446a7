"""The five phases of a migration, top to bottom, each run on the host that owns it.

    source_preflight    (source)       the domain exists, in a state the mode can move
    destination_prepare (destination)  room for it, no clash, storage made; reserve; hand-off
    perform             (source)       libvirt migrates; progress sampled every interval
    finish              (destination)  the domain is here as asked (running, paused, defined)
    confirm             (source)       the source copy is gone, inactive or kept, as asked

Each phase checks libvirt's real state before it acts and raises PhaseFailed with a reason an
operator can act on; worker/phase_scope.py does the bookkeeping around it. A phase returns the
job state to enter once it is done (or None to stay).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import libvirt
from celery.exceptions import Ignore

from config.events import get_logger
from jobs.maintenance import Maintenance
from jobs.model import Job
from jobs.record import Handoff
from jobs.spec import MigrationSpec
from jobs.states import TERMINAL, JobState
from jobs.store import JobNotFound
from worker.convergence import Action, ConvergencePolicy, drain_action
from worker.libvirt_host import (
    DomainFacts,
    checked_uri,
    facts,
    on_peer,
    open_checked,
    peer_domain,
    placement_room_mib,
)
from worker.migration_call import MigrationCall, UnsafeTarget, build_call, handoff_for
from worker.monitor import MigrationMonitor, Progress
from worker.phase_scope import (
    HandedOver,
    PhaseCancelled,
    PhaseFailed,
    advance,
    hold_domain,
    succeed_with_leftovers,
)
from worker.runtime import Runtime
from worker.storage import Disk, StorageError, create_targets, local_disks, remove_own

log = get_logger()
MS_PER_S = 1000


def source_preflight(rt: Runtime, job: Job) -> JobState | None:
    advance(rt, job, JobState.PREFLIGHT)
    spec = job.spec
    dom = rt.libvirt.by_name(spec.domain)
    if dom is None:
        raise PhaseFailed(f"{spec.domain} is not defined on {spec.src}")
    found = facts(dom)
    if spec.offline and not found.persistent:
        raise PhaseFailed(
            f"{spec.domain} is transient on {spec.src}; offline migration moves a persistent "
            "definition"
        )
    if not spec.offline and not found.active:
        raise PhaseFailed(
            f"{spec.domain} is {found.state} on {spec.src}; only --offline moves an inactive domain"
        )
    recorded: dict[str, Any] = found.as_dict()
    if spec.copy_storage is not None:
        recorded["disks"] = [d.as_dict() for d in local_disks(dom)]
        if not recorded["disks"]:
            raise PhaseFailed(f"--copy-storage: {spec.domain} has no local disk to copy")
    hold_domain(rt, job, found.uuid)
    rt.store.update(job.id, facts=recorded)
    log.info("preflight.facts", **found.as_dict())
    return None


def _free_memory_mib(rt: Runtime, job: Job) -> int:
    """Memory this host can still give: libvirt's free memory, capped by the declared limit."""
    reserved = rt.store.reserved_mib(rt.host, excluding=job.id)
    return placement_room_mib(rt.libvirt.conn, reserved, rt.registry_entry.limits.memory_mib)


def _dest_config_present(rt: Runtime, spec: MigrationSpec, uuid: str) -> bool:
    """Refuse a clash; say whether this host already holds the domain's inactive config."""
    same = rt.libvirt.by_uuid(uuid)
    if same is not None and same.isActive():
        raise PhaseFailed(f"{spec.domain} ({uuid}) is already running on {spec.dst}")
    named = rt.libvirt.by_name(spec.arrives_as)
    if named is not None and named.UUIDString() != uuid:
        raise PhaseFailed(
            f"{spec.dst} already has a different domain named {spec.arrives_as} "
            f"(uuid {named.UUIDString()}, migrating {uuid})"
        )
    if same is not None and same.name() != spec.arrives_as:
        raise PhaseFailed(
            f"{spec.dst} holds {spec.domain}'s uuid under the name {same.name()}; "
            f"it would arrive as {spec.arrives_as}"
        )
    return same is not None and bool(same.isPersistent())


@dataclass(frozen=True)
class SourceView:
    """The guest as the source's libvirtd shows it to the destination's worker."""

    facts: DomainFacts
    disks: list[Disk]


def _source_view(rt: Runtime, job: Job) -> SourceView:
    """Read the guest from the source's libvirtd (registry URI, signed name), not the record.

    The job record's facts were written by the source's worker, but anyone with the Redis
    password can rewrite them; what this host reserves, checks and creates comes from libvirt.
    """
    spec = job.spec
    with peer_domain(rt.settings.host(spec.src).peer_uri, spec.domain) as dom:
        if dom is None:
            raise PhaseFailed(f"{spec.domain} is not defined on {spec.src}")
        found = facts(dom)
        disks = local_disks(dom) if spec.copy_storage is not None else []
    recorded_uuid = job.facts.uuid if job.facts is not None else None
    if found.uuid != recorded_uuid:
        raise PhaseFailed(
            f"{spec.domain} on {spec.src} has uuid {found.uuid}, not the job's "
            f"{str(recorded_uuid)[:40]}"
        )
    return SourceView(found, disks)


def destination_prepare(rt: Runtime, job: Job) -> JobState | None:
    spec = job.spec
    refusal = Maintenance(rt.store.r).refusal(rt.host)
    if refusal is not None:
        raise PhaseFailed(refusal)
    source = _source_view(rt, job)
    uuid, need = source.facts.uuid, source.facts.memory_mib
    _take_incoming(rt, job, uuid)
    config_present = _dest_config_present(rt, spec, uuid)
    if (
        spec.undefine_source
        and not spec.persistent
        and source.facts.persistent
        and not config_present
        and not spec.force
    ):
        raise PhaseFailed(
            f"refusing: {spec.domain} is persistent on {spec.src} and {spec.dst} has no "
            "definition of it, so --undefine-source without --persistent would leave it "
            "defined nowhere; add --persistent, or --force to accept that"
        )
    if not spec.offline:
        free = _free_memory_mib(rt, job)
        if free < need:
            raise PhaseFailed(f"{spec.dst} has {free} MiB free, {spec.domain} needs {need} MiB")
        if not rt.store.reserve(spec.dst, job.id, need):
            log.info("phase.skipped", reason="the job ended while its memory was being booked")
            raise Ignore()
    handoff = _handoff(rt, spec)
    created: list[str] = []
    if spec.copy_storage is not None:
        if not source.disks:
            raise PhaseFailed(f"--copy-storage: {spec.domain} has no local disk to copy")
        try:
            created = create_targets(
                source.disks, rt.registry_entry.storage_dirs, rt.ledger, job.id
            )
        except StorageError as exc:
            raise PhaseFailed(f"{spec.dst}: {exc}") from None
    rt.store.update(
        job.id,
        handoff=handoff.model_copy(update={"created_images": created}),
        facts={"dest_config_present": config_present},
    )
    log.info(
        "prepare.ready",
        memory_mib=need,
        dest_config_present=config_present,
        created_images=created,
        **handoff.as_dict(),
    )
    return JobState.PREPARED


def _take_incoming(rt: Runtime, job: Job, uuid: str) -> None:
    """Record on this host (worker/ledger.py) that this job brings `uuid` in; refuse if another
    live job already is. Redis leases say the same thing, but they can run out under a live
    migration; the host's own record is what a rollback trusts before it destroys anything."""

    def ended(holder: str) -> bool:
        try:
            return rt.store.state(holder) in TERMINAL
        except JobNotFound:
            return True

    holder = rt.ledger.take_incoming(uuid, job.id, ended)
    if holder is not None:
        raise PhaseFailed(
            f"{job.spec.dst} is already bringing {job.spec.domain} ({uuid}) in for job "
            f"{holder}; refusing a second migration of it"
        )


def _handoff(rt: Runtime, spec: MigrationSpec) -> Handoff:
    """Where the guest goes, from the registry (worker/migration_call.py `handoff_for`)."""
    try:
        return handoff_for(spec, rt.settings.host(spec.dst))
    except UnsafeTarget as exc:
        raise PhaseFailed(str(exc)) from None


def job_domain(rt: Runtime, job: Job, name: str) -> libvirt.virDomain | None:
    """The job's guest on this host, by the uuid the source found, if it is named `name`.

    The uuid comes from the job record; the name from the signed spec. A uuid that names
    another domain here is a forged record: nothing is done to that domain.
    """
    dom = rt.libvirt.by_uuid(job.source.uuid)
    if dom is not None and dom.name() != name:
        raise PhaseFailed(
            f"the job's uuid is {dom.name()} on {rt.host}, not {name}: refusing to touch it"
        )
    return dom


def _ensure_running_on_source(rt: Runtime, job: Job) -> str:
    """After a failed migration, make sure the guest still runs here; say how it is."""
    dom = job_domain(rt, job, job.spec.domain)
    if dom is None or not dom.isActive():
        return f"{job.spec.domain} is no longer active on {rt.host}"
    state, _ = dom.state()
    if (
        state == libvirt.VIR_DOMAIN_PAUSED
        and job.facts is not None
        and job.facts.state == "running"
    ):
        dom.resume()
        log.warning("source.resumed", reason="migration failed with the guest paused")
    return f"{job.spec.domain} still running on {rt.host}"


def carry_out(dom: libvirt.virDomain, action: Action) -> bool:
    """Make libvirt do what the policy (or the operator) decided about a running migration;
    whether libvirt did.

    A refusal is logged and the migration goes on: it may still converge, and the fleet's
    hard limit (tunables.migration_timeout) aborts it in the end.
    """
    if action.kind in ("suspend", "postcopy"):
        log.warning("migration.timeout", action=action.kind, reason=action.reason)
    else:
        log.warning("migration.aborting", reason=action.reason, by=action.kind)
    try:
        if action.kind == "suspend":
            dom.suspend()  # the guest resumes on arrival (unless --suspend asked otherwise)
        elif action.kind == "postcopy":
            dom.migrateStartPostCopy()
        else:
            dom.abortJob()
    except libvirt.libvirtError as exc:
        log.warning("migration.action_failed", action=action.kind, error=exc.get_error_message())
        return False
    return True


def _invoke(dom: libvirt.virDomain, call: MigrationCall) -> None:
    """Make the libvirt call; managed direct and virDomainMigrate3 need a destination conn."""
    if call.api == "migrateToURI3":
        dconnuri = None if call.dconnuri is None else checked_uri(call.dconnuri)
        dom.migrateToURI3(dconnuri, call.params, call.flags)
        return
    assert call.dest_connection_uri is not None
    dconn = open_checked(call.dest_connection_uri)
    try:
        if call.api == "migrate3":
            dom.migrate3(dconn, call.params, call.flags)
        else:
            dname = call.params.get(libvirt.VIR_MIGRATE_PARAM_DEST_NAME)
            bandwidth = call.params.get(libvirt.VIR_MIGRATE_PARAM_BANDWIDTH, 0)
            dom.migrate2(dconn, None, call.flags, dname, None, bandwidth)
    finally:
        dconn.close()


def perform(rt: Runtime, job: Job) -> JobState | None:
    advance(rt, job, JobState.MIGRATING)
    spec = job.spec
    dom = job_domain(rt, job, spec.domain)
    if dom is None or (not spec.offline and not dom.isActive()):
        raise PhaseFailed(f"{spec.domain} is no longer running on {spec.src}")
    aborted = rt.store.abort_requested(job.id)
    if aborted:
        raise PhaseCancelled(f"{aborted} before the migration started; nothing moved")
    # Prepare refused a host in maintenance; one disabled since (another evacuation of it)
    # must not receive the guest either: this is the last moment before libvirt moves it.
    refusal = Maintenance(rt.store.r).refusal(spec.dst)
    if refusal is not None:
        raise PhaseFailed(f"{refusal}; it went into maintenance after prepare, nothing moved")
    call = build_call(spec, _handoff(rt, spec))
    log.info("migration.started", call=call.describe())
    tunables = rt.settings.tunables
    finished = threading.Event()
    outcome: dict[str, Any] = {}

    def migrate() -> None:
        try:
            _invoke(dom, call)
        except libvirt.libvirtError as exc:
            outcome["error"] = exc.get_error_message()
            outcome["code"] = exc.get_error_code()
        finally:
            finished.set()

    def on_progress(p: Progress) -> None:
        log.info("migration.progress", **p.as_event_fields())

    def on_action(action: Action) -> None:
        if action.kind in ("cancel", "abort"):
            outcome["cancel_reason" if action.kind == "cancel" else "abort_reason"] = action.reason
        done = carry_out(dom, action)
        if done and action.kind == "postcopy":
            rt.store.mark_postcopy(job.id)
        elif not done and action.kind == "cancel":
            # The operator's abort cannot be carried out (libvirt refuses to abort a post-copy
            # migration): the migration goes on, and the request is not left pending.
            rt.store.withdraw_abort(job.id)
            outcome.pop("cancel_reason", None)
            log.warning("migration.abort_refused", reason=action.reason)

    monitor = MigrationMonitor(
        dom,
        interval=tunables.progress_interval,
        policy=ConvergencePolicy.for_job(spec, tunables.migration_timeout),
        on_progress=on_progress,
        on_action=on_action,
        # Read once per tick, never waiting out a Redis outage: libvirt migrates meanwhile.
        abort_requested=lambda: rt.store.without_retry.abort_requested(job.id),
        drain=lambda: drain_action(spec, rt.drained_for(), tunables.drain_timeout),
    )
    started = time.monotonic()
    worker = threading.Thread(target=migrate, name=f"migrate-{job.id}", daemon=True)
    worker.start()
    if not spec.offline:  # an offline migration has no job statistics to sample
        monitor.run(finished)
    if monitor.handed_over is not None:
        raise HandedOver(monitor.handed_over.reason)
    worker.join()
    migration_ms = round((time.monotonic() - started) * MS_PER_S, 1)
    if "error" in outcome:
        where = _ensure_running_on_source(rt, job) if not spec.offline else "nothing moved"
        if "cancel_reason" in outcome:
            raise PhaseCancelled(f"{outcome['cancel_reason']}: migration aborted; {where}")
        why = outcome.get("abort_reason") or outcome["error"]
        raise PhaseFailed(f"migration to {spec.dst} failed: {why}; {where}")
    last = monitor.last.as_event_fields() if monitor.last else {}
    rt.store.update(job.id, result={"migration_ms": migration_ms, "last_progress": last})
    log.info("migration.completed", migration_ms=migration_ms)
    return None


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise PhaseFailed(reason)


def finish(rt: Runtime, job: Job) -> JobState | None:
    advance(rt, job, JobState.FINISHING)
    spec = job.spec
    dom = job_domain(rt, job, spec.arrives_as)
    if dom is None:
        raise PhaseFailed(f"{spec.arrives_as} is not on {spec.dst} after the migration")
    found: DomainFacts = facts(dom)
    here = f"{spec.arrives_as} on {spec.dst}"
    _expect(found.name == spec.arrives_as, f"{here} arrived named {found.name}")
    if spec.offline:
        _expect(not found.active, f"{here} is {found.state}; offline should leave it inactive")
    elif spec.suspend or (job.facts is not None and job.facts.state == "paused"):
        # libvirt keeps a paused guest paused; --suspend pauses a running one on arrival.
        _expect(found.state == "paused", f"{here} is {found.state}, expected paused")
    else:
        _expect(found.state == "running", f"{here} is {found.state}, expected running")
    wants_config = spec.persistent or (job.facts is not None and job.facts.dest_config_present)
    _expect(
        found.persistent == wants_config,
        f"{here} is {'persistent' if found.persistent else 'transient'}, expected "
        f"{'persistent' if wants_config else 'transient'}",
    )
    # The guest now really uses the memory that was reserved for it, and has arrived.
    rt.store.release(spec.dst, job.id)
    rt.ledger.drop_incoming(found.uuid, job.id)
    rt.store.update(job.id, result={"destination": found.as_dict()})
    log.info("finish.verified", state=found.state, persistent=found.persistent)
    return None


def confirm(rt: Runtime, job: Job) -> JobState | None:
    """Check what is left of the guest on the source; the job succeeds whatever that is.

    Confirm runs only after finish verified the guest on the destination: the move is done,
    and a source that does not look as asked (its definition removed by someone mid-flight,
    a copy still defined) is a leftover to report, not a failure to roll back (a rollback
    would be sent to the host where the guest now runs). The leftovers, and why, go into the
    job's result and a `confirm.leftovers` event.
    """
    spec = job.spec
    dom = job_domain(rt, job, spec.domain)
    here = f"{spec.domain} on {spec.src}"
    leftovers: list[str] = []
    if spec.offline:
        was_active = job.source.active
        if (dom is not None and bool(dom.isActive())) != was_active:
            leftovers.append(f"{here} changed state during an offline migration")
    elif dom is not None and dom.isActive():
        leftovers.append(f"{here} is still active after migrating")
    keeps_config = job.source.persistent and not spec.undefine_source
    defined = dom is not None and bool(dom.isPersistent())
    if defined != keeps_config:
        leftovers.append(
            f"{here} is {'still' if defined else 'no longer'} defined, expected "
            f"{'kept' if keeps_config else 'removed'}"
        )
    rt.store.update(job.id, result={"source_defined": defined})
    if leftovers:
        succeed_with_leftovers(rt, job, "; ".join(leftovers))
    else:
        log.info("confirm.verified", source_defined=defined)
    return JobState.SUCCEEDED


def start_postcopy(rt: Runtime, job: Job) -> None:
    """Switch a running pre-copy migration to post-copy (asked for by `drover postcopy`)."""
    if job.state is not JobState.MIGRATING:
        raise PhaseFailed(f"job {job.id} is {job.state.value}, not migrating")
    if not job.spec.postcopy:
        raise PhaseFailed(f"job {job.id} was not started with --postcopy")
    dom = job_domain(rt, job, job.spec.domain)
    if dom is None:
        raise PhaseFailed(f"{job.spec.domain} is not on {rt.host}")
    try:
        dom.migrateStartPostCopy()
    except libvirt.libvirtError as exc:
        reason = f"libvirt refused the switch to post-copy: {exc.get_error_message()}"
        raise PhaseFailed(reason) from None
    rt.store.mark_postcopy(job.id)
    log.info("migration.postcopy_started")


# A rollback is for a job that ended without moving its guest, and for nothing else: sent for
# a job still in flight (a replayed or forged message), it would destroy the incoming guest.
ROLLBACK_STATES = frozenset({JobState.FAILED, JobState.CANCELLED})


def rollback_destination(rt: Runtime, job: Job) -> None:
    """After a failure: free the reservation; nothing half-arrived or half-made stays here.

    Only what this job brought: a paused domain with the job's UUID is destroyed only if this
    host's ledger says this job is the one bringing it in (prepare recorded it). Another job
    for the same domain (its lease ran out in Redis) may be migrating it here right now; its
    incoming copy, perhaps in post-copy the only up-to-date one, is left alone.
    """
    if job.state not in ROLLBACK_STATES:
        raise PhaseFailed(
            f"job {job.id} is {job.state.value}; only a failed or cancelled job is rolled back"
        )
    rt.store.release(job.spec.dst, job.id)
    uuid = job.facts.uuid if job.facts is not None else None
    dom = job_domain(rt, job, job.spec.arrives_as) if uuid else None
    incoming = rt.ledger.incoming_job(uuid) if uuid else None
    if dom is not None and dom.isActive():
        state, _ = dom.state()
        if state == libvirt.VIR_DOMAIN_PAUSED and incoming != job.id:
            owner = f"job {incoming}'s" if incoming else "not recorded as any job's"
            log.warning(
                "rollback.kept_incoming",
                uuid=uuid,
                reason=f"the incoming {job.spec.arrives_as} on {rt.host} is {owner}, "
                "not this job's",
            )
        elif state == libvirt.VIR_DOMAIN_PAUSED and _active_on_source(rt, job):
            # This job's incoming copy that never started while the source still runs it.
            dom.destroy()
            log.warning("rollback.removed_incoming", uuid=uuid)
    if uuid:
        rt.ledger.drop_incoming(uuid, job.id)
    arrived = dom is not None and bool(dom.isActive())
    if not arrived:
        # Only what this worker recorded making for this job (worker/ledger.py).
        removed = remove_own(rt.ledger, job.id, rt.registry_entry.storage_dirs)
        if removed:
            log.info("rollback.removed_images", paths=removed)
    log.info("rollback.done")


def rollback_reconnecting(rt: Runtime, job: Job) -> None:
    """`rollback_destination` through a libvirtd that may have restarted during the job.

    Its connection then fails on first use; the rollback is run again on a fresh one
    (tunables.rollback_attempts), and an event says how it ended either way: `rollback.done`,
    or `rollback.failed` with why (the job's stream then shows what is left to clean up).
    """
    tunables = rt.settings.tunables

    def retrying(error: str, attempt: int) -> None:
        log.warning(
            "rollback.retrying", reason=error, attempt=attempt, of=tunables.rollback_attempts
        )

    try:
        rt.libvirt.reconnecting(
            lambda: rollback_destination(rt, job),
            attempts=tunables.rollback_attempts,
            delay=tunables.retry_delay,
            on_retry=retrying,
        )
    except PhaseFailed:
        raise  # a refusal (the job did not fail), reported as such by the task
    except Exception as exc:
        log.error("rollback.failed", reason=f"rollback on {rt.host} failed: {exc}")
        raise


def _active_on_source(rt: Runtime, job: Job) -> bool:
    """Ask the source's libvirtd directly: never remove the only running copy of a guest."""
    there = on_peer(rt.settings.host(job.spec.src).peer_uri, job.source.uuid)
    return there is not None and there.active
