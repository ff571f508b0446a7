"""The worker's half of the phase registry: the function that runs each phase of
jobs/phases.py `PHASES`. The Celery tasks (worker/tasks.py) and recovery (worker/recovery.py)
are built from this table, so a phase is named, ordered and bound in one place each."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.phases import PHASES, Phase, PhaseRule
from worker.phase_destination import destination_prepare, finish
from worker.phase_perform import perform
from worker.phase_run import PhaseFn
from worker.phase_source import confirm, source_preflight


@dataclass(frozen=True)
class BoundPhase:
    rule: PhaseRule
    run: PhaseFn


_FUNCTIONS: dict[Phase, PhaseFn] = {
    Phase.SOURCE_PREFLIGHT: source_preflight,
    Phase.DESTINATION_PREPARE: destination_prepare,
    Phase.PERFORM: perform,
    Phase.FINISH: finish,
    Phase.CONFIRM: confirm,
}
BOUND = {rule.phase: BoundPhase(rule, _FUNCTIONS[rule.phase]) for rule in PHASES}
