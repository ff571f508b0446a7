"""Putting a migration in line: the one path every job takes, whoever asks for it.

A producer's `submit` and an evacuation's child jobs both come through here, so the domain
lease, the queued event and the job's lane in the waiting line (jobs/lanes.py) hold for all
of them; the caller then runs admission on that lane (a producer) or on what can move (a
worker's pass), which starts whatever fits under the limits.
"""

from __future__ import annotations

from datetime import UTC, datetime

from jobs.admission import Admission
from jobs.model import queued_event
from jobs.quota import take_place
from jobs.request_signing import RequestSigner
from jobs.spec import MigrationSpec
from jobs.store import JobStore, domain_lock_key


class DomainBusy(Exception):
    """The domain already has a live job; the message is one line."""


def enqueue(
    store: JobStore,
    spec: MigrationSpec,
    *,
    origin: str,
    parent: str | None = None,
    parent_limit: int | None = None,
    reserve_mib: int | None = None,
    signer: RequestSigner | None = None,
    max_waiting: int | None = None,
) -> str:
    """Record the job, take its domain's name lease, and put it in the waiting line.

    `reserve_mib` books the guest's memory on the destination now (an evacuation's plan), so
    planners counting free memory see migrations planned as well as those in flight.
    `max_waiting` is the producer's quota of waiting jobs (jobs/quota.py): QuotaFull, and
    nothing kept, when it is reached.
    """
    job_id = store.create(
        spec, host=origin, parent=parent, parent_limit=parent_limit, signer=signer
    )
    if max_waiting is not None:
        try:
            take_place(store.r, origin, job_id, max_waiting)
        except Exception:
            store.discard(job_id)
            raise
    holder = store.take_lease(domain_lock_key("name", spec.domain), job_id)
    if holder is not None:
        store.discard(job_id)
        state = store.state(holder).value
        raise DomainBusy(f"{spec.domain} already has an active job {holder} ({state})")
    if reserve_mib is not None:
        store.reserve(spec.dst, job_id, reserve_mib)
    store.append_event(
        job_id,
        queued_event(job_id, spec, origin, parent=parent),
    )
    Admission(store).wait(job_id, spec, parent, datetime.now(UTC).timestamp())
    store.replicated()  # the job exists on a replica before its caller is told it does
    return job_id
