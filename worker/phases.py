"""The five phases of a migration, top to bottom, each run on the host that owns it.

    source_preflight   (source)       the domain exists and runs; record its facts
    destination_prepare (destination) room for it, no clash; reserve; hand-off URIs
    perform            (source)       libvirt migrates; progress sampled every interval
    finish             (destination)  the domain runs here, persistence as asked
    confirm            (source)       the source copy is gone or inactive, as asked

Each phase checks libvirt's real state before it acts and raises PhaseFailed with a reason an
operator can act on; worker/phase_scope.py does the bookkeeping around it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import libvirt

from config.events import get_logger
from jobs.model import Job
from jobs.states import JobState
from worker.convergence import Action, ConvergencePolicy
from worker.libvirt_host import facts
from worker.migration_call import Handoff, build_call
from worker.monitor import MigrationMonitor, Progress
from worker.phase_scope import PhaseFailed, advance
from worker.runtime import Runtime

log = get_logger()
MS_PER_S = 1000


def source_preflight(rt: Runtime, job: Job) -> JobState | None:
    advance(rt, job, JobState.PREFLIGHT)
    spec = job.spec
    dom = rt.libvirt.by_name(spec.domain)
    if dom is None:
        raise PhaseFailed(f"{spec.domain} is not defined on {spec.src}")
    found = facts(dom)
    if not found.active:
        raise PhaseFailed(
            f"{spec.domain} is {found.state} on {spec.src}; live migration needs it running"
        )
    rt.store.update(job.id, facts=found.as_dict())
    log.info("preflight.facts", **found.as_dict())
    return None


def _free_memory_mib(rt: Runtime, job: Job) -> int:
    """Memory this host can still give: libvirt's free memory, capped by the declared limit."""
    reserved = rt.store.reserved_mib(rt.host, excluding=job.id)
    free = rt.libvirt.free_memory_mib() - reserved
    limit = rt.registry_entry.limits.memory_mib
    if limit is not None:
        free = min(free, limit - rt.libvirt.active_memory_mib() - reserved)
    return max(free, 0)


def destination_prepare(rt: Runtime, job: Job) -> JobState | None:
    spec = job.spec
    uuid, need = job.facts["uuid"], int(job.facts["memory_mib"])
    same = rt.libvirt.by_uuid(uuid)
    if same is not None and same.isActive():
        raise PhaseFailed(f"{spec.domain} ({uuid}) is already running on {spec.dst}")
    named = rt.libvirt.by_name(spec.domain)
    if named is not None and named.UUIDString() != uuid:
        raise PhaseFailed(
            f"{spec.dst} already has a different domain named {spec.domain} "
            f"(uuid {named.UUIDString()}, migrating {uuid})"
        )
    free = _free_memory_mib(rt, job)
    if free < need:
        raise PhaseFailed(f"{spec.dst} has {free} MiB free, {spec.domain} needs {need} MiB")
    rt.store.reserve(spec.dst, job.id, need)
    entry = rt.registry_entry
    handoff = Handoff(dconnuri=entry.peer_uri, migrate_uri=f"tcp://{entry.migration_address}")
    rt.store.update(
        job.id, handoff={"dconnuri": handoff.dconnuri, "migrate_uri": handoff.migrate_uri}
    )
    log.info(
        "prepare.reserved",
        memory_mib=need,
        free_mib=free,
        dconnuri=handoff.dconnuri,
        migrate_uri=handoff.migrate_uri,
    )
    return JobState.PREPARED


def _ensure_running_on_source(rt: Runtime, job: Job) -> str:
    """After a failed migration, make sure the guest still runs here; say how it is."""
    dom = rt.libvirt.by_uuid(job.facts["uuid"])
    if dom is None or not dom.isActive():
        return f"{job.spec.domain} is no longer active on {rt.host}"
    state, _ = dom.state()
    if state == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()
        log.warning("source.resumed", reason="migration failed with the guest paused")
    return f"{job.spec.domain} still running on {rt.host}"


def perform(rt: Runtime, job: Job) -> JobState | None:
    advance(rt, job, JobState.MIGRATING)
    spec = job.spec
    dom = rt.libvirt.by_uuid(job.facts["uuid"])
    if dom is None or not dom.isActive():
        raise PhaseFailed(f"{spec.domain} is no longer running on {spec.src}")
    call = build_call(spec, Handoff.from_dict(job.handoff))
    log.info("migration.started", call=call.describe())
    tunables = rt.settings.tunables
    finished = threading.Event()
    outcome: dict[str, Any] = {}

    def migrate() -> None:
        try:
            dom.migrateToURI3(call.dconnuri, call.params, call.flags)
        except libvirt.libvirtError as exc:
            outcome["error"] = exc.get_error_message()
            outcome["code"] = exc.get_error_code()
        finally:
            finished.set()

    def on_progress(p: Progress) -> None:
        log.info("migration.progress", **p.as_event_fields())

    def on_action(action: Action) -> None:
        log.warning("migration.aborting", reason=action.reason)
        outcome["abort_reason"] = action.reason
        try:
            dom.abortJob()
        except libvirt.libvirtError as exc:
            log.warning("migration.abort_failed", error=exc.get_error_message())

    monitor = MigrationMonitor(
        dom,
        interval=tunables.progress_interval,
        policy=ConvergencePolicy(max_duration_s=tunables.migration_timeout),
        on_progress=on_progress,
        on_action=on_action,
    )
    started = time.monotonic()
    worker = threading.Thread(target=migrate, name=f"migrate-{job.id}", daemon=True)
    worker.start()
    monitor.run(finished)
    worker.join()
    migration_ms = round((time.monotonic() - started) * MS_PER_S, 1)
    if "error" in outcome:
        where = _ensure_running_on_source(rt, job)
        why = outcome.get("abort_reason") or outcome["error"]
        raise PhaseFailed(f"migration to {spec.dst} failed: {why}; {where}")
    last = monitor.last.as_event_fields() if monitor.last else {}
    rt.store.update(job.id, result={"migration_ms": migration_ms, "last_progress": last})
    log.info("migration.completed", migration_ms=migration_ms)
    return None


def finish(rt: Runtime, job: Job) -> JobState | None:
    advance(rt, job, JobState.FINISHING)
    spec = job.spec
    dom = rt.libvirt.by_uuid(job.facts["uuid"])
    if dom is None:
        raise PhaseFailed(f"{spec.domain} is not on {spec.dst} after the migration")
    found = facts(dom)
    if found.state != "running":
        raise PhaseFailed(f"{spec.domain} is {found.state} on {spec.dst}, expected running")
    if spec.persistent and not found.persistent:
        raise PhaseFailed(f"{spec.domain} arrived on {spec.dst} without a persistent definition")
    # The guest now really uses the memory that was reserved for it.
    rt.store.release(spec.dst, job.id)
    rt.store.update(job.id, result={"destination": found.as_dict()})
    log.info("finish.verified", state=found.state, persistent=found.persistent)
    return None


def confirm(rt: Runtime, job: Job) -> JobState | None:
    spec = job.spec
    dom = rt.libvirt.by_uuid(job.facts["uuid"])
    if dom is not None and dom.isActive():
        raise PhaseFailed(f"{spec.domain} is still active on {spec.src} after the migration")
    defined = dom is not None
    if spec.undefine_source and defined:
        raise PhaseFailed(f"{spec.domain} is still defined on {spec.src} despite undefine-source")
    rt.store.update(job.id, result={"source_defined": defined})
    log.info("confirm.verified", source_defined=defined)
    return JobState.SUCCEEDED


def rollback_destination(rt: Runtime, job: Job) -> None:
    """After a failure: free the reservation; the guest must not be left half-arrived here."""
    rt.store.release(job.spec.dst, job.id)
    uuid = job.facts.get("uuid")
    dom = rt.libvirt.by_uuid(uuid) if uuid else None
    if dom is not None and dom.isActive():
        state, _ = dom.state()
        if state == libvirt.VIR_DOMAIN_PAUSED and _active_on_source(rt, job):
            # An incoming copy that never started while the source still runs the guest.
            dom.destroy()
            log.warning("rollback.removed_incoming", uuid=uuid)
    log.info("rollback.done")


def _active_on_source(rt: Runtime, job: Job) -> bool:
    """Ask the source's libvirtd directly: never remove the only running copy of a guest."""
    try:
        conn = libvirt.open(rt.settings.host(job.spec.src).peer_uri)
    except libvirt.libvirtError:
        return False
    try:
        dom = conn.lookupByUUIDString(job.facts["uuid"])
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()
