"""The phases of one migration, in order, and which side of it runs each."""

from __future__ import annotations

from enum import StrEnum


class Side(StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"


class Phase(StrEnum):
    SOURCE_PREFLIGHT = "source_preflight"
    DESTINATION_PREPARE = "destination_prepare"
    PERFORM = "perform"
    FINISH = "finish"
    CONFIRM = "confirm"


PHASE_ORDER = (
    Phase.SOURCE_PREFLIGHT,
    Phase.DESTINATION_PREPARE,
    Phase.PERFORM,
    Phase.FINISH,
    Phase.CONFIRM,
)

PHASE_SIDE = {
    Phase.SOURCE_PREFLIGHT: Side.SOURCE,
    Phase.DESTINATION_PREPARE: Side.DESTINATION,
    Phase.PERFORM: Side.SOURCE,
    Phase.FINISH: Side.DESTINATION,
    Phase.CONFIRM: Side.SOURCE,
}

TASK_PREFIX = "drover."


def task_name(phase: Phase) -> str:
    return f"{TASK_PREFIX}{phase.value}"


ROLLBACK_DESTINATION_TASK = f"{TASK_PREFIX}rollback_destination"
POSTCOPY_TASK = f"{TASK_PREFIX}postcopy"
EVACUATE_TASK = f"{TASK_PREFIX}evacuate"
