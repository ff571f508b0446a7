"""Which worker event moves which metric: a pure table from an event to metric updates.

The structlog observer (worker/metrics_registry.py `WorkerMetrics.observe`) hands every
event of the chain to `updates`, and applies what comes back to the worker's registry;
nothing here touches prometheus_client, so the mapping is read (and tested) in one place.
The names and labels are the catalogue's (docs/metrics.md). Events of no job, or of an
evacuation, move nothing but the refused and recovery counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from config.metrics import PREFIX
from jobs.states import TERMINAL

MS_PER_S = 1000.0
UNKNOWN = "unknown"  # a label whose value the event did not carry
PERFORM = "perform"  # the phase whose run is the migration's transfer
TERMINAL_STATES = frozenset(s.value for s in TERMINAL)

# In flight (gauges, labels IN_FLIGHT_LABELS): name -> help.
IN_FLIGHT_LABELS = ("job", "domain", "src", "dst", "mode")
PROCESSED = f"{PREFIX}migration_data_processed_bytes"
REMAINING = f"{PREFIX}migration_data_remaining_bytes"
TOTAL = f"{PREFIX}migration_data_total_bytes"
TRANSFER_RATE = f"{PREFIX}migration_transfer_rate_bytes_per_second"
DIRTY_RATE = f"{PREFIX}migration_dirty_rate_bytes_per_second"
ITERATION = f"{PREFIX}migration_iteration"
EXPECTED_DOWNTIME = f"{PREFIX}migration_expected_downtime_seconds"
IN_FLIGHT_HELP = {
    PROCESSED: "Bytes the migration has transferred so far (libvirt data_processed).",
    REMAINING: "Bytes the migration still has to transfer (libvirt data_remaining).",
    TOTAL: "Bytes the migration has to transfer in all (libvirt data_total).",
    TRANSFER_RATE: "Memory transfer rate, bytes per second (libvirt memory_bps).",
    DIRTY_RATE: "Rate the guest dirties memory, bytes per second (pages/s x page size).",
    ITERATION: "Pre-copy pass over guest memory (libvirt memory_iteration).",
    EXPECTED_DOWNTIME: "Downtime libvirt expects at switch-over, seconds.",
}
STAGE_SECONDS = f"{PREFIX}migration_stage_seconds"
LAST_PROGRESS = f"{PREFIX}migration_last_progress_timestamp_seconds"

# Counters and histograms: name -> its labels besides `host`.
MIGRATIONS = f"{PREFIX}migrations"  # prometheus_client adds `_total`
DURATION = f"{PREFIX}migration_duration_seconds"
DOWNTIME = f"{PREFIX}migration_downtime_seconds"
PHASE_DURATION = f"{PREFIX}phase_duration_seconds"
POLICY_ACTIONS = f"{PREFIX}policy_actions"
RECOVERIES = f"{PREFIX}recoveries"
REFUSED = f"{PREFIX}messages_refused"
LABELS: dict[str, tuple[str, ...]] = {
    MIGRATIONS: ("mode", "outcome"),
    DURATION: ("mode", "outcome"),
    DOWNTIME: ("mode",),
    PHASE_DURATION: ("phase", "outcome"),
    POLICY_ACTIONS: ("action", "by"),
    RECOVERIES: ("kind",),
    REFUSED: ("reason",),
}

Event = Mapping[str, Any]


@dataclass(frozen=True)
class Sample:
    """A progress sample of a migration in flight: its series' new values."""

    job: str
    labels: tuple[str, ...]  # IN_FLIGHT_LABELS' values
    stage: str
    figures: dict[str, float]
    at: float  # unix time of the event


@dataclass(frozen=True)
class Gone:
    """The job's migration is no longer in flight here: its series go."""

    job: str


@dataclass(frozen=True)
class PhaseStart:
    job: str
    phase: str
    at: float


@dataclass(frozen=True)
class PhaseEnd:
    """A phase ended; `duration_s` when the event says, else from its start if seen."""

    job: str
    phase: str
    outcome: str
    at: float
    duration_s: float | None


@dataclass(frozen=True)
class Count:
    metric: str
    labels: tuple[str, ...]  # LABELS[metric]' values


@dataclass(frozen=True)
class Observe:
    metric: str
    labels: tuple[str, ...]
    value: float


Update = Sample | Gone | PhaseStart | PhaseEnd | Count | Observe


def event_time(event: Event) -> float:
    """The event's `ts` as unix time (the chain adds it before observers see the event)."""
    try:
        return datetime.fromisoformat(str(event.get("ts"))).timestamp()
    except ValueError:
        return time.time()


def _mode(event: Event) -> str:
    return str(event.get("migration_mode") or UNKNOWN)


def _text(event: Event, key: str) -> str:
    return str(event.get(key) or UNKNOWN)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def figures(event: Event) -> dict[str, float]:
    """A migration.progress event's figures in base units (a figure it lacks is left out)."""
    page = _number(event.get("memory_page_size")) or 0.0
    dirty = _number(event.get("memory_dirty_rate"))
    downtime = _number(event.get("downtime_ms"))
    raw = {
        PROCESSED: _number(event.get("data_processed")),
        REMAINING: _number(event.get("data_remaining")),
        TOTAL: _number(event.get("data_total")),
        TRANSFER_RATE: _number(event.get("memory_bandwidth")),
        DIRTY_RATE: None if dirty is None else dirty * page,
        ITERATION: _number(event.get("memory_iteration")),
        EXPECTED_DOWNTIME: None if downtime is None else downtime / MS_PER_S,
    }
    return {name: value for name, value in raw.items() if value is not None}


def _progress(event: Event) -> list[Update]:
    labels = (
        str(event["job_id"]),
        _text(event, "domain"),
        _text(event, "src"),
        _text(event, "dst"),
        _mode(event),
    )
    stage = _text(event, "stage")
    return [Sample(labels[0], labels, stage, figures(event), event_time(event))]


def _completed(event: Event) -> list[Update]:
    updates: list[Update] = [Gone(str(event["job_id"]))]
    downtime = _number(event.get("downtime_ms"))
    if downtime is not None:
        updates.append(Observe(DOWNTIME, (_mode(event),), downtime / MS_PER_S))
    return updates


def _job_state(event: Event) -> list[Update]:
    """A terminal state ends the job: counted where it was ended (one worker's transition
    moves a job to its end, so it is counted once in the fleet), and its series go."""
    state = event.get("state")
    if state not in TERMINAL_STATES:
        return []
    labels = (_mode(event), str(state))
    updates: list[Update] = [Gone(str(event["job_id"])), Count(MIGRATIONS, labels)]
    duration = _number(event.get("duration_s"))
    if duration is not None:
        updates.append(Observe(DURATION, labels, duration))
    return updates


def _phase_start(event: Event) -> list[Update]:
    return [PhaseStart(str(event["job_id"]), _text(event, "phase"), event_time(event))]


def _phase_end(outcome: str) -> Callable[[Event], list[Update]]:
    def rule(event: Event) -> list[Update]:
        job, phase = str(event["job_id"]), _text(event, "phase")
        duration_ms = _number(event.get("duration_ms"))
        duration = None if duration_ms is None else duration_ms / MS_PER_S
        updates: list[Update] = [PhaseEnd(job, phase, outcome, event_time(event), duration)]
        if phase == PERFORM:  # the transfer is over, whatever follows
            updates.append(Gone(job))
        return updates

    return rule


def _policy_step(event: Event) -> list[Update]:
    if event.get("done") is False:  # decided, but libvirt refused it: not taken
        return []
    return [Count(POLICY_ACTIONS, (_text(event, "action"), _text(event, "by")))]


def _named(metric: str) -> Callable[[Event], list[Update]]:
    """A counter whose one label is the event's name."""

    def rule(event: Event) -> list[Update]:
        return [Count(metric, (str(event["event"]),))]

    return rule


# Rules that need the event's job (skipped for an event without one).
JOB_RULES: dict[str, Callable[[Event], list[Update]]] = {
    "migration.progress": _progress,
    "migration.completed": _completed,
    "job.state": _job_state,
    "phase.started": _phase_start,
    "phase.finished": _phase_end("finished"),
    "phase.failed": _phase_end("failed"),
    "phase.skipped": _phase_end("skipped"),
    "policy.step": _policy_step,
}
# Rules for any event of that name, a job's or not.
ANY_RULES: dict[str, Callable[[Event], list[Update]]] = {
    "phase.recovering": _named(RECOVERIES),
    "migration.reattached": _named(RECOVERIES),
    "postcopy.resumed": _named(RECOVERIES),
    "security.rejected": _named(REFUSED),
    "message.rejected": _named(REFUSED),
    "control.refused": _named(REFUSED),
    "phase.duplicate": _named(REFUSED),
}


def updates(event: Event) -> list[Update]:
    """What `event` changes in the worker's metrics (nothing for most events)."""
    name = event.get("event")
    if not isinstance(name, str):
        return []
    found: list[Update] = []
    rule = JOB_RULES.get(name)
    if rule is not None and event.get("job_id"):
        found += rule(event)
    other = ANY_RULES.get(name)
    if other is not None:
        found += other(event)
    if name == "phase.recovering" and event.get("job_id"):  # a recovered phase starts again
        found += _phase_start(event)
    return found
