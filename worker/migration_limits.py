"""A host's own migration limits, kept by its worker: `max_outbound` as a source, when a
perform is about to start libvirt's migration; `max_inbound` as a destination, when prepare
books the guest's room (worker/destination_room.py).

Admission keeps the limits with concurrency slots in Redis (jobs/admission.py), which anyone
with a Redis password can delete: every queued guest would then be let in at once, and a host
would send or take more migrations than its operator allows. So each worker counts again,
from what no Redis write changes: the guests its ledger says it is sending, each still
counted only while its own libvirtd runs a job on that guest, and the memory bookings its
ledger holds for guests coming in. Each count and the step that adds to it are one step
under a file lock, so two phases starting together are never both let through.

With the slots kept, a phase finds its host full only for the moment a failed job's booking
waits for its rollback; a phase that finds it full waits (`limit_wait`, looking again every
`admission_interval`) and only then refuses its job, before anything moved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from config.events import get_logger
from jobs.model import Job
from jobs.states import TERMINAL
from jobs.store import JobNotFound
from worker.cancel_notice import abort_asked
from worker.ledger_limits import Sending
from worker.libvirt_states import StatsUnanswered, migration_stats
from worker.phase_errors import HandedOver, PhaseCancelled, PhaseFailed, PhaseSkipped
from worker.runtime import Runtime

log = get_logger()
SHOWN_JOBS = 3  # job ids named in a refusal; the count says how many there are


def wait_for_limit(rt: Runtime, job: Job, attempt: Callable[[], str | None]) -> str | None:
    """Run `attempt` (None: done; else why the host is full) until it is done or
    `limit_wait` has passed; the last reason, if it never was. Each new reason is said
    (`job.waiting`). A job aborted or ended meanwhile stops the wait: nothing moved."""
    tunables = rt.settings.tunables
    deadline = time.monotonic() + tunables.limit_wait
    said = None
    while True:
        busy = attempt()
        if busy is None or time.monotonic() >= deadline:
            return busy
        if busy != said:
            log.info("job.waiting", reason=busy)
            said = busy
        time.sleep(tunables.admission_interval)
        # The operator's abort: this host's record of its signed notice (worker/cancel_notice.py).
        aborted = abort_asked(rt, job.id)
        if aborted:
            raise PhaseCancelled(f"{aborted} while it waited ({busy}); nothing moved")
        if ended_in_redis(rt, job.id):
            log.info("phase.skipped", reason=f"the job ended while it waited ({busy})")
            raise PhaseSkipped("the job ended while it waited for its host's limit")


def ended_in_redis(rt: Runtime, job_id: str) -> bool:
    """Whether the job's record says it ended (or no record is left)."""
    try:
        return rt.store.state(job_id) in TERMINAL
    except JobNotFound:
        return True


def named(job_ids: list[str]) -> str:
    more = len(job_ids) - SHOWN_JOBS
    return ", ".join(job_ids[:SHOWN_JOBS]) + (f" and {more} more" if more > 0 else "")


# --- the source: guests this host is sending --------------------------------------------


@contextmanager
def sending(rt: Runtime, job: Job, uuid: str) -> Iterator[None]:
    """This host sends the job's guest (`uuid`) for the length of the block: counted with
    the others it sends, refused (PhaseFailed, nothing moved) while `max_outbound` of them
    are on their way after `limit_wait`."""

    def attempt() -> str | None:
        with rt.ledger.outbound_held():
            sender = other_sender(rt, job, uuid)
            if sender is not None:
                raise PhaseFailed(
                    f"{job.spec.domain} is on its way out of {rt.host} already, in job "
                    f"{sender} (this host's ledger); nothing moved"
                )
            busy = outbound_refusal(rt, job)
            if busy is None:
                rt.ledger.start_sending(job.id, uuid, time.time())
            return busy

    busy = wait_for_limit(rt, job, attempt)
    if busy is not None:
        raise PhaseFailed(f"{busy}; nothing moved")
    handed_over = False
    try:
        yield
    except HandedOver:
        # The migration goes on under the host's next worker: the guest still counts, for
        # as long as libvirt runs its job (`still_sending`).
        handed_over = True
        raise
    finally:
        if not handed_over:
            rt.ledger.stop_sending(job.id)


def other_sender(rt: Runtime, job: Job, uuid: str) -> str | None:
    """Another job this host is sending the same guest for (None: none), by its ledger.

    One job per guest is Redis's lease (jobs/lease.py), which anyone with the Redis password
    can delete (probe): a second job's migration call was then refused by libvirt, and its
    perform took the first job's migration for its own: its policy, abort or timeout stopped
    that job's signed migration. The ledger's rows are this host's own, and count while
    libvirt runs the guest's job (`still_sending`)."""
    return next(
        (s.job_id for s in rt.ledger.sending(job.id) if s.uuid == uuid and still_sending(rt, s)),
        None,
    )


def outbound_refusal(rt: Runtime, job: Job) -> str | None:
    """Why this host cannot send one more guest now (None: it can)."""
    limit = rt.registry_entry.limits.max_outbound
    others = []
    for s in rt.ledger.sending(job.id):
        if still_sending(rt, s):
            others.append(s.job_id)
        else:  # its worker died, and libvirt shows its migration over
            rt.ledger.stop_sending(s.job_id)
    if len(others) < limit:
        return None
    return (
        f"{rt.host} already sends {len(others)} guests ({named(others)}); "
        f"its max_outbound is {limit}"
    )


def still_sending(rt: Runtime, s: Sending) -> bool:
    """Whether a guest this host's ledger says it sends still counts: for `heartbeat_ttl`
    after its perform began (libvirt's job may not have started yet), then while this host's
    libvirtd runs a job on that guest. A perform that ended removed its own; one whose worker
    died counts until libvirt shows its migration over."""
    if time.time() - s.since < rt.settings.tunables.heartbeat_ttl:
        return True
    dom = rt.libvirt.by_uuid(s.uuid)
    if dom is None:
        return False
    try:
        return migration_stats(dom) is not None
    except StatsUnanswered:  # its job lock busy past libvirt's wait: a job runs
        return True
