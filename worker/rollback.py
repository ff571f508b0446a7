"""The destination's clean-up after a job that ended without moving its guest (the
`drover.rollback_destination` task): its reservation, its half-arrived copy, its images."""

from __future__ import annotations

import libvirt

from config.events import get_logger
from jobs.model import Job
from jobs.phases import Phase
from jobs.states import JobState
from worker.libvirt_host import Domain, is_paused, list_domains
from worker.libvirt_states import state_reason
from worker.phase_errors import PhaseFailed
from worker.phase_source import job_domain
from worker.runtime import Runtime
from worker.storage import disk_sources, remove_own

log = get_logger()

# A rollback is for a job that ended without moving its guest, and for nothing else: sent for
# a job still in flight (a replayed or forged message), it would destroy the incoming guest.
ROLLBACK_STATES = frozenset({JobState.FAILED, JobState.CANCELLED})
# Ends drover enters only after this host's finish (succeeded) or with nothing prepared here
# (checked): recorded for a job whose finish never ran here, a Redis write made them, and the
# job is rolled back here as a failed one would be (its booking held the host's room for good).
FORGED_UNLESS_FINISHED = frozenset({JobState.SUCCEEDED, JobState.CHECKED})


def ended_without_moving(rt: Runtime, job: Job) -> bool:
    """Whether the job's record says it ended without moving its guest here, as far as this
    host can tell: failed or cancelled, or an end that needs this host's finish, not run."""
    if job.state in ROLLBACK_STATES:
        return True
    return job.state in FORGED_UNLESS_FINISHED and not rt.ledger.claimed(job.id, Phase.FINISH.value)


def rollback_destination(rt: Runtime, job: Job) -> None:
    """After a failure: free the reservation; nothing half-arrived or half-made stays here.

    Only what this job brought: a paused domain with the job's UUID is destroyed only if this
    host's ledger says this job is the one bringing it in (prepare recorded it). Another job
    for the same domain (its lease ran out in Redis) may be migrating it here right now; its
    incoming copy, perhaps in post-copy the only up-to-date one, is left alone.
    """
    if not ended_without_moving(rt, job):
        raise PhaseFailed(
            f"job {job.id} is {job.state.value}; only a failed or cancelled job is rolled back"
        )
    uuid = _guest_uuid(rt, job)
    dom = job_domain(rt, job, job.spec.arrives_as) if uuid else None
    incoming = rt.ledger.incoming_job(uuid) if uuid else None
    coming = _coming_in(rt, job, dom) if incoming == job.id else None  # another's: kept below
    if coming is not None:  # "failed" is the record's word; libvirt's here is the last one
        raise PhaseFailed(
            f"{job.spec.arrives_as} on {rt.host} is {coming}: libvirt shows its migration "
            "still coming in; nothing is rolled back while it does"
        )
    if incoming == job.id and uuid is not None and _landed_unfinished(rt, job, dom, uuid):
        raise PhaseFailed(
            f"{job.spec.arrives_as} arrived on {rt.host}, brought in by this job, whose finish "
            "has not run here: libvirt shows it moved, whatever the record says; nothing is "
            "rolled back (the job is taken back up as its finish would)"
        )
    rt.store.release(job.spec.dst, job.id)
    rt.ledger.release_booking(job.id)
    if dom is not None and dom.isActive():
        paused = is_paused(dom)
        if paused and incoming != job.id:
            owner = f"job {incoming}'s" if incoming else "not recorded as any job's"
            log.warning(
                "rollback.kept_incoming",
                uuid=uuid,
                reason=f"the incoming {job.spec.arrives_as} on {rt.host} is {owner}, "
                "not this job's",
            )
        elif paused and uuid is not None and _active_on_source(rt, job, uuid):
            # This job's incoming copy that never started while the source still runs it.
            dom.destroy()
            log.warning("rollback.removed_incoming", uuid=uuid)
        elif (shown := state_reason(dom)).postcopy_failed:
            _say_kept_postcopy(rt, job, shown.describe())
    if uuid:
        rt.ledger.drop_incoming(uuid, job.id)
    arrived = dom is not None and bool(dom.isActive())
    if arrived and uuid is not None and incoming == job.id:
        # libvirt moved it, and finish found it other than asked (or never ran to its end):
        # the guest is where it runs; only what the job held here is given back.
        log.warning(
            "rollback.kept_arrived",
            uuid=uuid,
            reason=f"{job.spec.arrives_as} runs on {rt.host}, brought in by this job: kept",
        )
    made = rt.ledger.images(job.id)
    if made:
        kept_why = _keep_images(rt, job, uuid, arrived)
        if kept_why is not None:  # no longer this job's to remove, by any later rollback
            rt.ledger.forget_images(job.id)
            log.warning("rollback.kept_images", paths=made, reason=kept_why)
        else:
            # Only what this worker recorded making for this job (worker/ledger.py), and of
            # that, nothing a domain here names (libvirt's word, not the record's).
            removed, kept = remove_own(
                rt.ledger, job.id, rt.registry_entry.storage_dirs, _paths_in_use(rt)
            )
            if removed:
                log.info("rollback.removed_images", paths=removed)
            if kept:
                log.warning(
                    "rollback.kept_images",
                    paths=kept,
                    reason=f"a domain on {rt.host} uses them",
                )
    log.info("rollback.done")


def _guest_uuid(rt: Runtime, job: Job) -> str | None:
    """The guest's uuid as this host's prepare saw it (its ledger), else the record's, else
    None (the job failed before its source looked)."""
    seen = rt.ledger.facts(job.id)
    if seen is not None:
        return seen.uuid
    return job.facts.uuid if job.facts is not None else None


def _paths_in_use(rt: Runtime) -> set[str]:
    """The disk paths every domain defined or running on this host names, live and
    persistent definitions both (a failure to read them fails the rollback: nothing is
    removed on a guess)."""
    used: set[str] = set()
    for dom in list_domains(rt.libvirt.conn):
        used |= disk_sources(dom.XMLDesc(0))
        if dom.isActive() and dom.isPersistent():
            used |= disk_sources(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return used


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


def _landed_unfinished(rt: Runtime, job: Job, dom: Domain | None, uuid: str) -> bool:
    """The guest this job brought in has landed here (active, no migration coming in, not a
    post-copy, and its source no longer runs it) while this host's finish never ran: a record
    ended by hand mid-migration. An attacker probe had the rollback, its libvirt calls held
    until the landing, drop such a guest's ledger rows (nothing could take the job back up
    after). A finish that ran and failed it is rolled back as before."""
    if dom is None or not dom.isActive() or rt.ledger.claimed(job.id, Phase.FINISH.value):
        return False
    return not state_reason(dom).in_postcopy and not _active_on_source(rt, job, uuid)


def _active_on_source(rt: Runtime, job: Job, uuid: str) -> bool:
    """Ask the source's libvirtd directly: never remove the only running copy of a guest."""
    there = rt.libvirt.on_peer(rt.settings.host(job.spec.src).peer_uri, uuid)
    return there is not None and there.active


def _coming_in(rt: Runtime, job: Job, dom: Domain | None) -> str | None:
    """How libvirt shows the job's guest still arriving here (None: it does not): in a
    post-copy that may still end (running, or failed while the source's copy takes part: a
    resume can land it), or paused by an incoming migration libvirt still runs (its job
    active). A failed post-copy the source no longer takes part in is lost, not arriving:
    its copy is kept below, as the guest's newest memory, unless the source runs the guest."""
    if dom is None or not dom.isActive():
        return None
    found = state_reason(dom)
    if found.in_postcopy:
        if found.postcopy_failed and not _source_in_postcopy(rt, job):
            return None
        return found.describe()
    incoming = (found.state, found.reason) == (
        libvirt.VIR_DOMAIN_PAUSED,
        libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
    )
    if incoming and incoming_job(dom):
        return f"{found.describe()}, its incoming migration job active"
    return None


def _source_in_postcopy(rt: Runtime, job: Job) -> bool:
    """Whether the source's libvirtd shows the guest in a post-copy (LibvirtUnavailable when
    it does not answer: the rollback is tried again)."""
    with rt.libvirt.peer_domain(rt.settings.host(job.spec.src).peer_uri, job.spec.domain) as dom:
        return dom is not None and state_reason(dom).in_postcopy


def _say_kept_postcopy(rt: Runtime, job: Job, shown: str) -> None:
    log.warning(
        "rollback.kept_incoming",
        reason=f"{job.spec.arrives_as} on {rt.host} is {shown} and {job.spec.src}'s copy no "
        "longer takes part: it holds the guest's newest memory, kept for the operator",
    )


def incoming_job(dom: Domain) -> bool:
    """Whether libvirt runs an incoming migration job on `dom`: it refuses its statistics then
    ("available only on the source host", VIR_ERR_OPERATION_UNSUPPORTED, seen on the lab)."""
    try:
        return bool(dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_UNSUPPORTED:
            return True
        raise


def _keep_images(rt: Runtime, job: Job, uuid: str | None, arrived: bool) -> str | None:
    """Why the images this host made for the job stay (None: they go). They are the only
    copy of the guest's newest disk writes unless the source still runs the guest: libvirt's
    word there, or the record's that the job reached post-copy (a word that only keeps)."""
    spec = job.spec
    if arrived:
        return f"{spec.arrives_as} runs on {rt.host}: they are its disks"
    if job.postcopy_since is not None:
        return "the job reached post-copy: they may hold the guest's newest disk writes"
    if uuid is None or not _source_runs_it(rt, job, uuid):
        return (
            f"{spec.src} does not run {spec.domain}: they may hold the guest's newest disk writes"
        )
    return None


def _source_runs_it(rt: Runtime, job: Job, uuid: str) -> bool:
    """Whether the source's libvirtd runs the guest itself, outside any post-copy (read over
    the registry's peer URI; unreachable: LibvirtUnavailable, and the rollback is tried
    again rather than images removed)."""
    with rt.libvirt.peer_domain(rt.settings.host(job.spec.src).peer_uri, job.spec.domain) as dom:
        if dom is None or dom.UUIDString() != uuid:
            return False
        found = state_reason(dom)
        return found.active and not found.in_postcopy
