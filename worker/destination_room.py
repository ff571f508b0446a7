"""Whether the destination has room for the guest coming in: fewer guests coming in than its
`max_inbound`, and libvirt's free memory, less what the other live jobs booked here, capped by
the host's declared limit.

Bookings are kept in Redis, for the planners of every host, and in this host's ledger, which
no Redis write changes. A ledger booking holds until this host's finish or rollback releases
it, whatever the job's record says (`booking_over`).
"""

from __future__ import annotations

from jobs.model import Job
from jobs.reservation_read import reserved_by_host
from jobs.store import JobNotFound
from worker.host_memory import placement_room_mib
from worker.migration_limits import named, wait_for_limit
from worker.runtime import Runtime


def take_room(rt: Runtime, job: Job, need: int) -> str | None:
    """Book `need` MiB here in this host's ledger for `job`, or the refusal (nothing booked).
    The checks and the booking are one step (`Ledger.room_held`): two guests arriving at once
    are never both checked against the room before either is booked. A host that already
    takes `max_inbound` guests is waited for (worker/migration_limits.py); one without the
    memory refuses at once."""
    memory: list[str | None] = []

    def attempt() -> str | None:
        with rt.ledger.room_held():
            held = held_bookings(rt, job)
            busy = inbound_refusal(rt, job, held)
            if busy is None:
                refusal = memory_refusal(rt, job, need, held)
                if refusal is None:
                    rt.ledger.book(job.id, need)
                memory.append(refusal)
            return busy

    busy = wait_for_limit(rt, job, attempt)
    return busy if busy is not None else memory[-1]


def held_bookings(rt: Runtime, job: Job) -> list[tuple[str, int]]:
    """The other jobs' bookings in this host's ledger that still hold (`booking_over`), and
    their MiB: what both the inbound count and the room are judged by."""
    return [
        (other, mib) for other, mib in rt.ledger.booked_jobs(job.id) if not booking_over(rt, other)
    ]


def inbound_refusal(rt: Runtime, job: Job, held: list[tuple[str, int]]) -> str | None:
    """Why this host cannot take one more guest now (None: it can): its ledger holds
    bookings for `max_inbound` others."""
    limit = rt.registry_entry.limits.max_inbound
    others = [other for other, _ in held]
    if len(others) < limit:
        return None
    return (
        f"{rt.host} already takes {len(others)} guests ({named(others)}); "
        f"its max_inbound is {limit}"
    )


def memory_refusal(
    rt: Runtime, job: Job, need: int, held: list[tuple[str, int]] | None = None
) -> str | None:
    """Refused when this host cannot give `need` MiB: libvirt's free memory less the other
    jobs' bookings here (Redis's, of live jobs; or this host's own ledger's, held until this
    host releases them, when those are more), capped by the declared limit; bookings that
    cannot be read leave none, and the refusal says why (jobs/reservation_read.py). `held`:
    the ledger's bookings as `held_bookings` just read them (read here without)."""
    found = reserved_by_host(rt.store.r, [rt.host], excluding=job.id)[rt.host]
    bookings = held if held is not None else held_bookings(rt, job)
    held_mib = sum(max(mib, 0) for _, mib in bookings)
    reserved = max(found, held_mib) if isinstance(found, int) else None
    free = placement_room_mib(rt.libvirt.conn, reserved, rt.registry_entry.limits.memory_mib)
    if free >= need:
        return None
    why = f" ({found})" if isinstance(found, str) else ""
    return f"{job.spec.dst} has {free} MiB free{why}, {job.spec.domain} needs {need} MiB"


def booking_over(rt: Runtime, job_id: str) -> bool:
    """Whether another job's ledger booking here holds nothing any more. While the job has a
    record, whatever its state, the booking holds until this host's finish or rollback
    releases it: a record written ended must not free the room its guest is about to take
    (the source's perform migrates here on its own). Once no record is left, it holds while
    this host's libvirtd runs the guest the job was bringing in."""
    try:
        rt.store.state(job_id)
    except JobNotFound:  # gone (or unreadable, written so by hand)
        pass
    else:
        return False
    uuid = rt.ledger.incoming_uuid(job_id)
    if uuid is None:
        return True
    dom = rt.libvirt.by_uuid(uuid)
    return dom is None or not dom.isActive()
