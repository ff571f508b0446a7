"""A migration as a Celery chain: each phase a task on the queue of the host that owns it.

Producers start the chain; a recovering worker resumes it from the phase it recovered. Built
from the phase registry (jobs/phases.py), like the tasks it names.

Signatures are immutable and carry only the job id; the chain moves on only when a phase
succeeds, so a failed phase stops everything after it.
"""

from __future__ import annotations

from celery import Celery, chain
from celery.canvas import Signature

from config.celery import host_queue
from jobs.phases import PHASE_ORDER, Phase, owner_of, task_name
from jobs.spec import MigrationSpec

# A dry run's chain: the checks of both sides, never the phases that move anything.
DRY_RUN_PHASES = (Phase.SOURCE_PREFLIGHT, Phase.DESTINATION_PREPARE)


def migration_chain(
    app: Celery, job_id: str, spec: MigrationSpec, start: Phase = PHASE_ORDER[0]
) -> Signature:
    """The chain from `start` to the end: the whole job, or what is left after a recovery."""
    steps = [
        app.signature(
            task_name(phase),
            args=(job_id,),
            immutable=True,
            queue=host_queue(owner_of(spec, phase)),
        )
        for phase in PHASE_ORDER[PHASE_ORDER.index(start) :]
        if phase in DRY_RUN_PHASES or not spec.dry_run
    ]
    return chain(*steps)
