"""Running pre-checks: each a named function returning a refusal (or None), all run, every
verdict recorded in the job's result and as an event, the job refused with all the reasons.

Every check only reads (libvirt, the host's file systems); all of them run even after one
refuses, so that an operator (and `drover migrate --dry-run`) sees every reason at once.
"""

from __future__ import annotations

from collections.abc import Callable

from config.events import batched, get_logger
from jobs.model import Job
from jobs.phases import Side
from jobs.record import CheckVerdict
from worker.libvirt_host import LibvirtError, is_connection_error
from worker.phase_errors import PhaseFailed
from worker.runtime import Runtime

log = get_logger()

Check = tuple[str, Callable[[], str | None]]


def verdicts(host: str, checks: list[Check]) -> list[CheckVerdict]:
    """Run every check; a refusal is its reason, passing is None."""
    found = []
    for name, check in checks:
        try:
            reason = check()
        except PhaseFailed as exc:  # a check built on a phase's own refusal
            reason = exc.reason
        except LibvirtError as exc:
            if is_connection_error(exc):
                raise  # the phase's retry on a fresh connection (worker/phase_frame.py)
            # A check that cannot be made refuses: nothing moves on an unanswered question.
            reason = f"{name} check could not be made: {exc.get_error_message()}"
        found.append(CheckVerdict(check=name, host=host, passed=reason is None, reason=reason))
    return found


def enforce(
    rt: Runtime,
    job: Job,
    side: Side,
    checks: list[Check],
    *,
    fail: bool = True,
    earlier: list[CheckVerdict] | None = None,
) -> None:
    """Run the checks, record the verdicts; PhaseFailed with every refusal if any refused.

    A dry run's source passes `fail=False` so the destination's checks run too; the
    destination then passes the source's verdicts as `earlier` and fails on either's.
    """
    found = verdicts(rt.host, checks)
    with batched():  # one round trip for all the verdicts
        for v in found:
            if v.passed:
                log.info("precheck.passed", check=v.check)
            else:
                log.warning("precheck.refused", check=v.check, reason=v.reason)
    rt.store.update(
        job.id, result={f"{side.value}_checks": [v.model_dump(mode="json") for v in found]}
    )
    refusals = [v.reason for v in [*(earlier or []), *found] if v.reason and not v.passed]
    if refusals and fail:
        raise PhaseFailed("; ".join(refusals))
