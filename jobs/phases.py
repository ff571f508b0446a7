"""The one registry of a migration's phases: their order, the side that runs each, whether a
phase may be retried, and how recovery settles one that was interrupted.

Everything that lists phases is built from `PHASES`: the Celery tasks (worker/tasks.py, which
binds a function to each through worker/registry.py), the chain (jobs/workflow.py), recovery
(worker/recovery.py) and the heartbeat's phase marks. The jobs layer holds names and rules
only; the worker binds the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from config.security import ABORT_NOTICE_TASK as ABORT_NOTICE_TASK
from config.security import CANCEL_NOTICE_TASK as CANCEL_NOTICE_TASK
from config.security import TASK_PREFIX as TASK_PREFIX
from jobs.spec import MigrationSpec


class Side(StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"


class Phase(StrEnum):
    SOURCE_PREFLIGHT = "source_preflight"
    DESTINATION_PREPARE = "destination_prepare"
    PERFORM = "perform"
    FINISH = "finish"
    CONFIRM = "confirm"


class Recovery(StrEnum):
    """How a phase this host started and then lost (its worker died) is settled."""

    RERUN = "rerun"  # run it again: its checks read libvirt's real state before acting
    REATTACH = "reattach"  # wait for the migration libvirtd may still run, then judge


@dataclass(frozen=True)
class PhaseRule:
    phase: Phase
    side: Side
    # Whether a phase that could not reach its libvirtd may be tried again (as often as
    # tunables.phase_retries says): only one that changes nothing before that check.
    retryable: bool
    recovery: Recovery


PHASES = (
    PhaseRule(Phase.SOURCE_PREFLIGHT, Side.SOURCE, retryable=True, recovery=Recovery.RERUN),
    PhaseRule(Phase.DESTINATION_PREPARE, Side.DESTINATION, retryable=True, recovery=Recovery.RERUN),
    PhaseRule(Phase.PERFORM, Side.SOURCE, retryable=False, recovery=Recovery.REATTACH),
    PhaseRule(Phase.FINISH, Side.DESTINATION, retryable=True, recovery=Recovery.RERUN),
    PhaseRule(Phase.CONFIRM, Side.SOURCE, retryable=True, recovery=Recovery.RERUN),
)
RULES = {rule.phase: rule for rule in PHASES}
PHASE_ORDER = tuple(rule.phase for rule in PHASES)
PHASE_SIDE = {rule.phase: rule.side for rule in PHASES}
PHASE_NAMES = frozenset(phase.value for phase in PHASE_ORDER)


def owner_of(spec: MigrationSpec, phase: Phase) -> str:
    """The host whose worker runs `phase` of a migration of `spec`."""
    return spec.src if PHASE_SIDE[phase] is Side.SOURCE else spec.dst


def next_phase(phase: Phase) -> Phase | None:
    index = PHASE_ORDER.index(phase)
    return PHASE_ORDER[index + 1] if index + 1 < len(PHASE_ORDER) else None


def task_name(phase: Phase) -> str:
    return f"{TASK_PREFIX}{phase.value}"


ROLLBACK_DESTINATION_TASK = f"{TASK_PREFIX}rollback_destination"
POSTCOPY_TASK = f"{TASK_PREFIX}postcopy"
TUNE_TASK = f"{TASK_PREFIX}tune"
FORCE_COMPLETE_TASK = f"{TASK_PREFIX}force_complete"
EVACUATE_TASK = f"{TASK_PREFIX}evacuate"
