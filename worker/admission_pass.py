"""The worker's side of admission: start waiting jobs that now fit (jobs/admission.py).

Every worker runs the quick pass on a short tick and right after a job it ran has ended
(which is when a slot comes free), so a waiting migration starts within moments whoever's
slot it takes; the pass reads only the lanes that can move. The safety pass, much rarer and
done by one worker of the fleet at a time, looks at every lane's head, so that no step lost
to a crash can leave a lane stranded.
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


def _admission(rt: Runtime) -> Admission:
    return Admission(rt.store, verifier_for(rt.settings.security))


def admit_waiting(rt: Runtime) -> list[str]:
    """The quick pass: ready lanes and those blocked on a gate with room now."""
    return _admission(rt).pass_(rt.settings, _start)


def admit_safety(rt: Runtime) -> list[str]:
    """The safety pass: every lane's head (and the line of versions before lanes), by one
    worker of the fleet per `admission_safety_interval`."""
    admission = _admission(rt)
    if not admission.lanes.claim_safety_pass(
        rt.worker_id, rt.settings.tunables.admission_safety_interval
    ):
        return []
    return admission.safety_pass(rt.settings, _start)
