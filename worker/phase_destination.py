"""The destination's phases: destination_prepare before the migration, finish after it.

    destination_prepare  the pre-checks (CPU, anti-affinity, hugepages, disks, room, memory,
                         no clash: docs/prechecks.md); memory reserved; storage made; hand-off.
                         A dry run ends here, `checked`, having taken nothing
    finish               the domain is here as asked (running, paused, defined)

What the destination reserves, checks and creates comes from libvirt (its own, and the
source's read over the registry's peer URI), never from the job record alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from config.events import get_logger
from jobs.model import Job
from jobs.phases import Side
from jobs.prepared_receipt import sign_prepared
from jobs.record import DiskFacts, DomainFacts, Handoff, SourceFacts
from jobs.request_signing import signer_for
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import now
from worker.compression_support import compression_params, unsupported
from worker.destination_room import memory_refusal, take_room
from worker.domain_xml_check import checked_xml
from worker.job_end import advance
from worker.libvirt_host import facts
from worker.maintenance_kept import maintenance_refusal
from worker.migration_call import UnsafeTarget, handoff_for
from worker.migration_limits import ended_in_redis
from worker.phase_errors import PhaseFailed, PhaseSkipped
from worker.phase_source import job_domain
from worker.precheck import Check, enforce
from worker.precheck_destination import SourceGuest, destination_checks, read_source_guest
from worker.runtime import Runtime
from worker.storage import StorageError, create_targets, local_disks

log = get_logger()


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
    disks: list[DiskFacts]
    guest: SourceGuest


def _source_view(rt: Runtime, job: Job) -> SourceView:
    """Read the guest from the source's libvirtd (registry URI, signed name), not the record.

    The job record's facts were written by the source's worker, but anyone with the Redis
    password can rewrite them; what this host reserves, checks and creates comes from libvirt.
    """
    spec = job.spec
    with rt.libvirt.peer_domain(rt.settings.host(spec.src).peer_uri, spec.domain) as dom:
        if dom is None:
            raise PhaseFailed(f"{spec.domain} is not defined on {spec.src}")
        found = facts(dom)
        disks = local_disks(dom, spec.migrate_disks) if spec.copy_storage is not None else []
        guest = read_source_guest(dom)
        # --xml may move a file disk within this host's storage directories: made there.
        moves = checked_xml(spec, dom, rt.registry_entry.storage_dirs).disk_moves
    disks = [d.model_copy(update={"path": moves.get(d.path, d.path)}) for d in disks]
    recorded_uuid = job.facts.uuid if job.facts is not None else None
    if found.uuid != recorded_uuid:
        raise PhaseFailed(
            f"{spec.domain} on {spec.src} has uuid {found.uuid}, not the job's "
            f"{str(recorded_uuid)[:40]}"
        )
    return SourceView(found, disks, guest)


def destination_prepare(rt: Runtime, job: Job) -> JobState | None:
    spec = job.spec
    refusal = maintenance_refusal(rt)
    if refusal is not None:
        raise PhaseFailed(refusal)
    if spec.compression is not None:  # the methods this host's libvirt must also take in
        version = rt.libvirt.conn.getLibVersion()
        lacking = unsupported(compression_params(spec.compression), version, spec.dst)
        if lacking is not None:
            raise PhaseFailed(lacking)
    source = _source_view(rt, job)
    # The planner chose this host from published facts; its own libvirtd decides.
    uuid, need = source.facts.uuid, source.facts.memory_mib
    # A dry run's source recorded its verdicts without failing: its refusals count here.
    earlier = job.result.source_checks if spec.dry_run else None
    enforce(rt, job, Side.DESTINATION, _checks(rt, job, source), earlier=earlier)
    if spec.dry_run:  # every check passed; nothing is taken, reserved or made
        log.info("precheck.dry_run_passed")
        return JobState.CHECKED
    _take_incoming(rt, job, uuid)
    definition, config_present = _definition(rt, spec, source.facts)  # again, now taken
    if definition is not None:
        raise PhaseFailed(definition)
    # What finish checks the arrival against, and the uuid every later step here looks the
    # guest up by: this host's own look, kept where only root writes (the record's copy is
    # for people; anyone with the Redis password can edit it). Kept before anything is made
    # here, so a rollback after a failure below also goes by it.
    rt.ledger.remember_facts(
        job.id, SourceFacts(**source.facts.model_dump(), dest_config_present=config_present)
    )
    if not spec.offline:
        refusal = take_room(rt, job, need)
        if refusal is not None:
            raise PhaseFailed(refusal)
        if not rt.store.reserve(spec.dst, job.id, need):
            rt.ledger.release_booking(job.id)
            log.info("phase.skipped", reason="the job ended while its memory was being booked")
            raise PhaseSkipped("the job ended while its memory was being booked")
    handoff = handoff_or_fail(rt, spec)
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
    # Last: the source's perform migrates only with this host's signed word that it did all
    # of the above for this guest (jobs/prepared_receipt.py).
    receipt = sign_prepared(signer_for(rt.settings.security), job.id, rt.host, uuid, now())
    if receipt is not None:
        rt.store.mark_prepared(job.id, receipt)
    return JobState.PREPARED


def _checks(rt: Runtime, job: Job, source: SourceView) -> list[Check]:
    """The destination's pre-checks (worker/precheck_destination.py), with the incoming,
    clash and memory checks this phase makes again when it takes and reserves."""
    spec = job.spec
    dirs = rt.registry_entry.storage_dirs
    checks = destination_checks(spec, source.guest, rt.libvirt.conn, rt.host, dirs)
    checks.insert(0, ("incoming", lambda: _incoming_refusal(rt, job, source.facts.uuid)))
    checks.append(("definition", lambda: _definition_refusal(rt, spec, source.facts)))
    if not spec.offline:
        need = source.facts.memory_mib
        checks.append(("memory", lambda: memory_refusal(rt, job, need)))
    return checks


def _definition_refusal(rt: Runtime, spec: MigrationSpec, found: DomainFacts) -> str | None:
    """A clash with a domain here, or a definition --undefine-source would leave nowhere."""
    return _definition(rt, spec, found)[0]


def _definition(rt: Runtime, spec: MigrationSpec, found: DomainFacts) -> tuple[str | None, bool]:
    """`_definition_refusal`, and whether this host holds the domain's inactive config (one
    look at libvirt for both)."""
    config_present = _dest_config_present(rt, spec, found.uuid)
    if (
        spec.undefine_source
        and not spec.persistent
        and found.persistent
        and not config_present
        and not spec.force
    ):
        return (
            f"refusing: {spec.domain} is persistent on {spec.src} and {spec.dst} has no "
            "definition of it, so --undefine-source without --persistent would leave it "
            "defined nowhere; add --persistent, or --force to accept that"
        ), config_present
    return None, config_present


def _incoming_clash(job: Job, uuid: str, holder: str) -> str:
    return (
        f"{job.spec.dst} is already bringing {job.spec.domain} ({uuid}) in for job "
        f"{holder}; refusing a second migration of it"
    )


def _incoming_refusal(rt: Runtime, job: Job, uuid: str) -> str | None:
    """The check `_take_incoming` makes again when it takes: another live job brings the guest
    in (first, so the reason names that job whatever else the second one's checks say)."""
    holder = rt.ledger.incoming_job(uuid)
    if holder is None or holder == job.id or ended_in_redis(rt, holder):
        return None
    return _incoming_clash(job, uuid, holder)


def _take_incoming(rt: Runtime, job: Job, uuid: str) -> None:
    """Record on this host (worker/ledger.py) that this job brings `uuid` in; refuse if another
    live job already is. Redis leases say the same thing, but they can run out under a live
    migration; the host's own record is what a rollback trusts before it destroys anything."""
    holder = rt.ledger.take_incoming(uuid, job.id, lambda h: ended_in_redis(rt, h))
    if holder is not None:
        raise PhaseFailed(_incoming_clash(job, uuid, holder))


def handoff_or_fail(rt: Runtime, spec: MigrationSpec) -> Handoff:
    """Where the guest goes, from the registry (worker/migration_call.py `handoff_for`)."""
    try:
        return handoff_for(spec, rt.settings.host(spec.dst))
    except UnsafeTarget as exc:
        raise PhaseFailed(str(exc)) from None


def _expect(condition: bool, reason: str, where: str) -> None:
    """The arrival as asked, or the job fails saying `where` the guest is: here, where it
    stays (libvirt moved it; probe: "failed" alone read as "on the source, rolled back")."""
    if not condition:
        raise PhaseFailed(f"{reason}: {where}")


def _arrival_states(suspend: bool, before: SourceFacts | None) -> tuple[str, ...]:
    """The states a live migration may leave the guest in here: libvirt keeps a paused guest
    paused, and --suspend pauses a running one on arrival. Without this host's own look at
    the source (its ledger lost), either of libvirt's is accepted, never the record's word."""
    if suspend or (before is not None and before.state == "paused"):
        return ("paused",)
    return ("running",) if before is not None else ("running", "paused")


def finish(rt: Runtime, job: Job) -> JobState | None:
    advance(rt, job, JobState.FINISHING)
    spec = job.spec
    dom = job_domain(rt, job, spec.arrives_as)
    if dom is None:
        raise PhaseFailed(f"{spec.arrives_as} is not on {spec.dst} after the migration")
    found: DomainFacts = facts(dom)
    here = f"{spec.arrives_as} on {spec.dst}"
    stays = f"libvirt shows it on {spec.dst} ({found.state}), where it stays"
    where = f"{stays}; nothing of it is rolled back"
    _expect(found.name == spec.arrives_as, f"{here} arrived named {found.name}", where)
    # How the guest was before, as this host's prepare read it from the source's libvirtd.
    before = rt.ledger.facts(job.id)
    if spec.offline:
        _expect(
            not found.active,
            f"{here} is {found.state}; offline should leave it inactive",
            where,
        )
    else:
        states = _arrival_states(spec.suspend, before)
        expected = " or ".join(states)
        _expect(found.state in states, f"{here} is {found.state}, expected {expected}", where)
    wants_config = spec.persistent or (before is not None and before.dest_config_present)
    if before is not None or spec.persistent:  # unknown: either is what libvirt may leave
        _expect(
            found.persistent == wants_config,
            f"{here} is {'persistent' if found.persistent else 'transient'}, expected "
            f"{'persistent' if wants_config else 'transient'}",
            where,
        )
    # The guest now really uses the memory that was reserved for it, and has arrived: the
    # images made for it are its disks now, no longer this job's to remove.
    rt.store.release(spec.dst, job.id)
    rt.ledger.release_booking(job.id)
    rt.ledger.forget_images(job.id)
    rt.ledger.drop_incoming(found.uuid, job.id)
    rt.store.update(job.id, result={"destination": found.model_dump()})
    log.info("finish.verified", state=found.state, persistent=found.persistent)
    return None
