"""The worker's side of admission: start waiting jobs that now fit (jobs/admission.py).

Every worker runs it on a short tick and right after a job it ran has ended (which is when a
slot comes free), so a waiting migration starts within moments whoever's slot it takes.
"""

from __future__ import annotations

from config.celery import app
from config.events import get_logger
from jobs.admission import Admission
from jobs.request_signing import verifier_for
from jobs.spec import MigrationSpec
from jobs.workflow import migration_chain
from worker.runtime import Runtime

log = get_logger()


def _start(job_id: str, spec: MigrationSpec) -> None:
    migration_chain(app, job_id, spec).apply_async()
    log.info("job.admitted", job_id=job_id, domain=spec.domain, src=spec.src, dst=spec.dst)


def admit_waiting(rt: Runtime) -> list[str]:
    verifier = verifier_for(rt.settings.security)
    return Admission(rt.store, verifier).admit_waiting(rt.settings, _start)
