"""The source's phases: source_preflight before the migration, confirm after it.

    source_preflight  the domain exists, in a state the mode can move; the source's pre-checks
                      (disk safety, --migrate-disks: docs/prechecks.md); its facts recorded
    confirm           the source copy is gone, inactive or kept, as asked (else leftovers)

Each checks libvirt's real state before it acts and raises PhaseFailed with a reason an
operator can act on; worker/phase_frame.py does the bookkeeping around it. A phase returns
the job state to enter once it is done (or None to stay).
"""

from __future__ import annotations

from typing import Any

from config.events import get_logger
from jobs.model import Job
from jobs.phases import Side
from jobs.record import SourceFacts
from jobs.states import JobState
from worker.domain_xml_check import checked_xml
from worker.job_end import advance, hold_domain, succeed_with_leftovers
from worker.libvirt_host import Domain, facts, is_paused
from worker.libvirt_states import paused_for_postcopy, state_reason
from worker.phase_errors import NeverLeft, PhaseFailed
from worker.precheck import enforce
from worker.precheck_source import source_checks
from worker.runtime import Runtime
from worker.storage import local_disks

log = get_logger()


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
    running_refusal = offline_of_running(job, found.active)
    if running_refusal is not None:
        raise PhaseFailed(running_refusal)
    checked_xml(spec, dom, rt.settings.host(spec.dst).storage_dirs)  # --xml, before all else
    recorded: dict[str, Any] = found.model_dump()
    checks = source_checks(spec, dom.XMLDesc(0), rt.libvirt.conn.getType)
    enforce(rt, job, Side.SOURCE, checks, fail=not spec.dry_run)
    if spec.copy_storage is not None:
        recorded["disks"] = [d.model_dump() for d in local_disks(dom, spec.migrate_disks)]
        if not recorded["disks"]:
            raise PhaseFailed(f"--copy-storage: {spec.domain} has no local disk to copy")
    if not spec.dry_run:  # a dry run holds nothing: a real job of the guest may run beside it
        hold_domain(rt, job, found.uuid)
    # This host's own copy: what later phases here decide from (the record's is for people).
    rt.ledger.remember_facts(job.id, SourceFacts.model_validate(recorded))
    rt.store.update(job.id, facts=recorded)
    log.info("preflight.facts", **found.model_dump())
    return None


def guest_uuid(rt: Runtime, job: Job) -> str:
    """The job's guest's uuid as this host's own libvirt calls found it (its ledger: the
    source's preflight, the destination's prepare reading the source); the job record's only
    when this host never looked (its ledger lost with it). A uuid rewritten in the record
    would otherwise make finish miss a guest that arrived, fail its job, and have the
    rollback take the guest for absent and remove the disk images it runs on."""
    seen = rt.ledger.facts(job.id)
    return seen.uuid if seen is not None else job.source.uuid


def job_domain(rt: Runtime, job: Job, name: str) -> Domain | None:
    """The job's guest on this host, by its uuid (`guest_uuid`), if it is named `name`.

    The name comes from the signed spec. A uuid that names another domain here (a forged
    record, with this host's own look lost) is refused: nothing is done to that domain.
    """
    dom = rt.libvirt.by_uuid(guest_uuid(rt, job))
    if dom is not None and dom.name() != name:
        raise PhaseFailed(
            f"the job's uuid is {dom.name()} on {rt.host}, not {name}: refusing to touch it"
        )
    return dom


def resume_if_left_paused(rt: Runtime, dom: Domain, job: Job, why: str) -> None:
    """A guest that was running before its migration and is left paused by it runs again;
    never one paused by post-copy (its newest memory is on the destination, and libvirt
    blocks the resume then fails it: worker/postcopy_recovery.py resumes the migration).

    "Was running" is what this host's preflight saw (its ledger), never the job record: a
    record rewritten to say so would have a guest the operator paused resumed."""
    if not is_paused(dom):
        return
    if paused_for_postcopy(dom):
        log.warning("source.not_resumed", reason=f"{why}, but paused by post-copy")
        return
    before = rt.ledger.facts(job.id)
    if before is None:
        log.warning("source.not_resumed", reason=f"{why}; {rt.host} has no record of its state")
    elif before.state == "running":
        dom.resume()
        log.warning("source.resumed", reason=why)


def ensure_running_on_source(rt: Runtime, job: Job) -> str:
    """After a failed migration, make sure the guest still runs here; say how it is."""
    dom = job_domain(rt, job, job.spec.domain)
    if dom is None or not dom.isActive():
        return f"{job.spec.domain} is no longer active on {rt.host}"
    if paused_for_postcopy(dom):
        return f"{job.spec.domain} is {state_reason(dom).describe()} on {rt.host}"
    resume_if_left_paused(rt, dom, job, "migration failed with the guest paused")
    return still_here(dom, job.spec.domain, rt.host)


def still_here(dom: Domain, name: str, host: str) -> str:
    """Where the guest is after a migration that did not complete, as libvirt shows it now:
    "running", or "paused" when it was left paused and not resumed (this host saw it
    paused before the migration, or has no record of how it was)."""
    return f"{name} still {'paused' if is_paused(dom) else 'running'} on {host}"


def _runs_on_destination(rt: Runtime, job: Job) -> bool:
    """Whether the destination's libvirtd runs the job's guest (by uuid), read over the
    registry's peer URI; unreachable: LibvirtUnavailable (confirm is tried again)."""
    found = rt.libvirt.peer_facts(rt.settings.host(job.spec.dst).peer_uri, guest_uuid(rt, job))
    return found is not None and found.active


def offline_of_running(job: Job, active: bool) -> str | None:
    """Why an offline move of a guest that runs must not be made (None: it may be).

    libvirt's offline migration copies a definition, whatever the guest's state: the guest
    goes on running here, and is defined on the destination too, where starting it would
    run one guest twice on its disks (migration guide, "Offline migration"). Asked for by
    hand, that copy is what the operator chose. Not so (probe) when the operator asked for
    the source's definition to go (`--undefine-source`: libvirt keeps it while the guest
    runs, and the job "succeeded" with the guest defined on both hosts), nor for an
    evacuation's move planned while the guest was shut off and started since."""
    spec = job.spec
    if not (spec.offline and active):
        return None
    if job.parent is not None:
        return (
            f"{spec.domain} runs on {spec.src} now; its evacuation planned it shut off (an "
            "offline move of its definition), which would leave it running here and defined "
            f"on {spec.dst}: nothing moved (evacuate again to move it live)"
        )
    if spec.undefine_source:
        return (
            f"{spec.domain} runs on {spec.src}: --offline copies only its definition, and "
            "libvirt keeps the source's while it runs, so --undefine-source would leave it "
            "defined on both hosts; shut it down first, or migrate it --live"
        )
    return None


def confirm(rt: Runtime, job: Job) -> JobState | None:
    """Check what is left of the guest on the source; the job succeeds whatever that is.

    Confirm runs only after finish verified the guest on the destination: the move is done,
    and a source that does not look as asked (its definition removed by someone mid-flight,
    a copy still defined) is a leftover to report, not a failure to roll back (a rollback
    would be sent to the host where the guest now runs). The leftovers, and why, go into the
    job's result and a `confirm.leftovers` event.

    "Finish verified it" is the job record's word, which anyone with the Redis password can
    write. So a guest still running here is a leftover only if the destination's libvirtd
    runs it too; if it does not, the guest never left, and the job fails (NeverLeft) whatever
    the record says of finish.
    """
    spec = job.spec
    dom = job_domain(rt, job, spec.domain)
    here = f"{spec.domain} on {spec.src}"
    leftovers: list[str] = []
    # How the guest was before, as this host's preflight saw it (the record's copy only if
    # this host's is gone: it shapes the report of leftovers, nothing done to the guest).
    before = rt.ledger.facts(job.id) or job.source
    if spec.offline:
        was_active = before.active
        if (dom is not None and bool(dom.isActive())) != was_active:
            leftovers.append(f"{here} changed state during an offline migration")
    elif dom is not None and dom.isActive():
        if not _runs_on_destination(rt, job):
            raise NeverLeft(
                f"{here} still runs and {spec.dst}'s libvirtd does not run it: the guest never left"
            )
        leftovers.append(f"{here} is still active after migrating")
    keeps_config = before.persistent and not spec.undefine_source
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
