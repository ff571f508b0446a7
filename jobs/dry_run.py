"""Starting a dry run (`drover migrate --dry-run`): a job record that runs the checks only.

A dry run is recorded and signed like any job, so the workers read its spec from the same
validated record; but it does not wait in a lane, takes no admission slot (it is marked
admitted with no gates: the phase frame runs only admitted jobs), no domain lease and no
memory. Its chain is source_preflight then destination_prepare (jobs/workflow.py); the
destination ends it `checked` when every check passed, `failed` with the reasons if not.
Whatever a tampered message asks, perform refuses a dry run's spec.
"""

from __future__ import annotations

from jobs.keys import GATES_FIELD, job_key
from jobs.model import queued_event
from jobs.request_signing import RequestSigner
from jobs.spec import MigrationSpec
from jobs.store import JobStore, now


def record_dry_run(
    store: JobStore, spec: MigrationSpec, *, origin: str, signer: RequestSigner | None
) -> str:
    """Record the dry run, admitted with no slot; the caller sends its chain."""
    if not spec.dry_run:
        raise ValueError("record_dry_run takes a dry-run spec")
    job_id = store.create(spec, host=origin, signer=signer)
    store.r.hset(job_key(job_id), mapping={"admitted": now().isoformat(), GATES_FIELD: ""})
    store.append_event(
        job_id,
        queued_event(job_id, spec, origin, dry_run=True),
    )
    store.replicated()
    return job_id
