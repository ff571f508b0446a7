"""The operator's control of a running migration, on its source host: `drover tune` (new
bandwidth and downtime limits), `drover postcopy` and `drover force-complete` (Nova's
live-migration-force-complete: post-copy where allowed, else pause the guest so that the rest
is copied at once; it resumes on arrival).

Redis names the job, and for a tune the numbers, which are validated again here (jobs/control.py);
whether the job may be acted on is asked of libvirt: the job must be migrating in its record
AND libvirt must show an outgoing migration job on the domain. Each change is a `policy.step`
event (by="operator"); a refusal is PhaseFailed with one line (`control.refused`). A tune is
all or nothing where drover can tell beforehand: a post-copy bandwidth for a job whose
effective policy, as this worker computes it, forbids post-copy refuses the whole request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import libvirt

from config.events import get_logger
from jobs.control import (
    TUNE_OPTIONS,
    BadControlRequest,
    TuneRequest,
    not_migrating,
    pop_tune,
    postcopy_off,
)
from jobs.model import Job
from jobs.request_signing import verifier_for
from worker import job_locks, switch_asked
from worker.ledger import Ledger
from worker.libvirt_host import Domain, LibvirtError
from worker.libvirt_states import StatsUnanswered, migration_stats, state_reason
from worker.phase_errors import PhaseFailed
from worker.phase_source import job_domain
from worker.policy_source import job_policy
from worker.postcopy_switch import operator_switch, refuse_if_aborting
from worker.runtime import Runtime

log = get_logger()
OPERATOR = "operator"
# The tune's figures that govern pre-copy only: after the switch they change nothing.
PRECOPY_ONLY = frozenset({"bandwidth_mib", "max_downtime_ms"})
# How often per progress interval a request that came during the migration's setup looks
# again whether the transfer has begun.
SETUP_POLLS_PER_INTERVAL = 5
# libvirt's statistics a force-complete step reports (as migration.progress names them).
LOOKED_AT = {
    "data_remaining": "data_remaining",
    "memory_iteration": "memory_iteration",
    "memory_dirty_rate": "memory_dirty_rate",
    "memory_bps": "memory_bandwidth",
    "time_elapsed": "time_elapsed_ms",
}


def migrating_domain(rt: Runtime, job: Job, what: str) -> tuple[Domain, dict[str, Any]]:
    """The job's guest here while libvirt migrates it out, and the migration's statistics;
    PhaseFailed (one line) otherwise."""
    reason = not_migrating(job, what)
    if reason is not None:
        raise PhaseFailed(reason)
    if rt.host != job.spec.src:
        raise PhaseFailed(f"job {job.id} migrates from {job.spec.src}, not from {rt.host}")
    dom = job_domain(rt, job, job.spec.domain)
    if dom is None:
        raise PhaseFailed(f"{job.spec.domain} is not on {rt.host}: nothing to {what}")
    return dom, _wait_for_transfer(rt, job, dom, what)


def _wait_for_transfer(rt: Runtime, job: Job, dom: Domain, what: str) -> dict[str, Any]:
    """Return once libvirt migrates the guest out and QEMU transfers memory; PhaseFailed when
    libvirt shows no such migration. A migration still in libvirt's setup (the destination
    being prepared) is waited for, up to tunables.control_setup_wait: what is set before
    QEMU starts would be overwritten by the migration's own parameters, and QEMU cannot
    switch to post-copy yet."""
    tunables = rt.settings.tunables
    started = time.monotonic()
    deadline = started + tunables.control_setup_wait
    outgoing = libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT
    while True:
        try:
            stats = migration_stats(dom)
        except StatsUnanswered as exc:  # no word on the migration yet: asked again
            if time.monotonic() > deadline:  # the time it took, libvirt's waits included
                raise PhaseFailed(
                    f"libvirt on {rt.host} did not give the statistics of {job.spec.domain}'s "
                    f"migration for {time.monotonic() - started:.0f}s ({exc}): nothing done"
                ) from None
            time.sleep(tunables.progress_interval / SETUP_POLLS_PER_INTERVAL)
            continue
        if stats is None or stats.get("operation", outgoing) != outgoing:
            raise PhaseFailed(
                f"libvirt on {rt.host} shows no migration of {job.spec.domain} running: "
                f"nothing to {what}"
            )
        if stats.get("memory_total", 0) > 0:
            return stats
        if time.monotonic() > deadline:
            raise PhaseFailed(
                f"the migration of {job.spec.domain} is still being set up after "
                f"{tunables.control_setup_wait:g}s: try again once it transfers"
            )
        time.sleep(tunables.progress_interval / SETUP_POLLS_PER_INTERVAL)


@contextmanager
def one_control(rt: Runtime, job: Job) -> Iterator[None]:
    """One operator control of `job` at a time in this worker (worker/job_locks.py): one
    asked while another is still before libvirt waits tunables.control_lock_wait, then is
    refused in one line, never holding a worker thread for as long as libvirt takes."""
    wait_s = rt.settings.tunables.control_lock_wait
    try:
        with job_locks.held(job.id, wait_s):
            yield
    except job_locks.JobBusy:
        raise PhaseFailed(
            f"another change to job {job.id}'s migration (an operator's control, or a step of "
            f"its policy) is still before libvirt on {rt.host} (waited {wait_s:g}s): try "
            "again in a moment"
        ) from None


def _step(action: str, reason: str, **figures: Any) -> None:
    log.info("policy.step", action=action, by=OPERATOR, reason=reason, **figures)


def tune(rt: Runtime, job: Job, request_id: str) -> None:
    """Apply the tune request of the task `request_id` to the job's running migration."""
    try:
        request = pop_tune(rt.store.r, job.id, request_id, verifier_for(rt.settings.security))
    except BadControlRequest as exc:
        raise PhaseFailed(str(exc)) from None
    if request is None:
        raise PhaseFailed(f"job {job.id} has no tune request waiting")
    with one_control(rt, job):
        _tune(rt, job, request)


def _tune(rt: Runtime, job: Job, request: TuneRequest) -> None:
    dom, _ = migrating_domain(rt, job, "tune")
    refused = postcopy_refusal(rt, job, dom, request) or _precopy_figures_refusal(dom, request)
    if refused is not None:
        raise PhaseFailed(refused)
    applied = apply_tune(dom, request, job.id, rt.ledger)
    who = f" by {request.by}" if request.by else ""
    _step("tune", f"asked{who} (drover tune)", **applied)


def postcopy_refusal(rt: Runtime, job: Job, dom: Domain, request: TuneRequest) -> str | None:
    """Why the request may not be applied at all, or None: it names a post-copy bandwidth and
    the job's effective policy, computed here (worker/policy_source.py: this worker's registry
    and the domain's metadata, not the policy recorded in Redis), forbids post-copy.

    The producer refuses such a request before sending it (jobs/control.py postcopy_off), but
    one written into Redis by hand or sent by an older producer reaches this worker: the whole
    request is refused, its other figures too, as an operator reads one `drover tune` (one
    command, one change or none), rather than half of it applied and the rest refused."""
    if request.postcopy_bandwidth_mib is None:
        return None
    policy = job_policy(rt, job, dom)
    why = postcopy_off(job.model_copy(update={"policy": policy}), request)
    return None if why is None else f"{why}; nothing of this tune request was applied"


def _precopy_figures_refusal(dom: Domain, request: TuneRequest) -> str | None:
    """Why a request naming pre-copy limits is refused whole in post-copy, or None. libvirt
    takes them and they change nothing any more: a probe was told "bandwidth_mib=20" and
    "max_downtime_ms=50" applied after the switch."""
    lapsed = [TUNE_OPTIONS[f] for f in request.figures() if f in PRECOPY_ONLY]
    if not lapsed or not state_reason(dom).in_postcopy:
        return None
    return (
        f"the migration is in post-copy: {' and '.join(lapsed)} no longer apply (only "
        f"{TUNE_OPTIONS['postcopy_bandwidth_mib']} does); nothing of this tune request was "
        "applied"
    )


def apply_tune(dom: Domain, request: TuneRequest, job_id: str, ledger: Ledger) -> dict[str, int]:
    """Set each limit the request names; the values set, by field. libvirt's refusal of
    any of them is PhaseFailed, naming what was already set. Called only once the request
    has passed `postcopy_refusal`. A downtime set here stands against the policy's own
    downtime steps for the rest of the migration (worker/migration_watch.py carry_out_step),
    noted in the ledger under the job's lock as libvirt takes it."""

    def downtime(v: int) -> None:
        with job_locks.held(job_id):
            dom.migrateSetMaxDowntime(v, 0)
            ledger.note_operator_downtime(job_id, v)

    calls = {
        "bandwidth_mib": lambda v: dom.migrateSetMaxSpeed(v, 0),
        "postcopy_bandwidth_mib": lambda v: dom.migrateSetMaxSpeed(
            v, libvirt.VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY
        ),
        "max_downtime_ms": downtime,
    }
    applied: dict[str, int] = {}
    for field, value in request.figures().items():
        try:
            calls[field](value)
        except LibvirtError as exc:
            done = f" (already set: {applied})" if applied else ""
            raise PhaseFailed(
                f"libvirt refused {field}={value}: {exc.get_error_message()}{done}"
            ) from None
        applied[field] = value
    return applied


def start_postcopy(rt: Runtime, job: Job) -> None:
    """Switch a running pre-copy migration to post-copy (asked for by `drover postcopy`),
    answered as tune and force-complete are: `policy.step` once libvirt took the switch, or
    the refusal (a probe: the command said "post-copy requested" whatever happened).

    As tune and force-complete, it waits for libvirt to transfer: QEMU refuses a switch asked
    during libvirt's setup ("Enable postcopy with migrate_set_capability before the start of
    migration"), and a probe lost requests so, 0.4 to 1.6 s after the job said `migrating`.
    A migration libvirt shows in post-copy already is refused: asking again made a second
    `migration.postcopy_started` and moved the record's moment of the switch."""
    with one_control(rt, job):  # two asked at once: the second finds the first's switch
        dom, _ = migrating_domain(rt, job, "switch to post-copy")
        if state_reason(dom).in_postcopy or switch_asked.asked(job.id):
            raise PhaseFailed(f"job {job.id} is already in post-copy: it completes on its own")
        if not job_policy(rt, job, dom).values.allow_postcopy:
            raise PhaseFailed(f"job {job.id}'s policy does not allow post-copy")
        try:
            operator_switch(rt, job, dom, "switched to post-copy")
        except LibvirtError as exc:
            reason = f"libvirt refused the switch to post-copy: {exc.get_error_message()}"
            raise PhaseFailed(reason) from None
        _step("postcopy", "drover postcopy")  # the answer `drover postcopy` waits for


def force_complete(rt: Runtime, job: Job) -> None:
    """Finish the migration now: switch to post-copy when the job's effective policy allows it
    and libvirt's migration was started with post-copy allowed, else suspend the guest. Two
    asked at once are one after the other (worker/job_locks.py): the second finds the
    first's switch or pause and says so (both were answered "switched")."""
    with one_control(rt, job):
        dom, stats = migrating_domain(rt, job, "force-complete")
        _force_complete(rt, job, dom, stats)


def _force_complete(rt: Runtime, job: Job, dom: Domain, stats: dict[str, Any]) -> None:
    refuse_if_aborting(rt, job, "force-completed")
    seen = {field: stats[name] for name, field in LOOKED_AT.items() if name in stats}
    found = state_reason(dom)
    # libvirt's state and this process's own switch, never the record's `postcopy_since`
    # (a probe's forged one made force-complete answer "already in post-copy" in pre-copy).
    if found.in_postcopy or switch_asked.asked(job.id):
        raise PhaseFailed(f"job {job.id} is already in post-copy: it completes on its own")
    if found.state == libvirt.VIR_DOMAIN_PAUSED:
        raise PhaseFailed(f"{job.spec.domain} is already paused: the rest is being copied")
    policy = job_policy(rt, job, dom)
    why_not = f"policy {policy.name} forbids post-copy"
    if policy.values.allow_postcopy:
        try:
            operator_switch(rt, job, dom, "force-completed")
        except LibvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                raise PhaseFailed(
                    f"libvirt refused the switch to post-copy: {exc.get_error_message()}"
                ) from None
            # Not started with VIR_MIGRATE_POSTCOPY (or not switchable): pause instead.
            why_not = f"libvirt cannot switch to post-copy: {exc.get_error_message()}"
        else:
            _step("postcopy", f"force-complete: policy {policy.name} allows post-copy", **seen)
            return
    rt.ledger.note_finish_pause(job.id)  # before: a restart right after it still knows
    try:
        dom.suspend()  # the guest resumes on arrival (phase_destination.py)
    except LibvirtError as exc:
        reason = f"libvirt refused to pause the guest: {exc.get_error_message()}"
        raise PhaseFailed(reason) from None
    _step("suspend", f"force-complete: {why_not}; the guest is paused until it arrives", **seen)
