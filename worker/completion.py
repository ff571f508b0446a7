"""How a finished migration went, from libvirt's completed job statistics: the guest's
downtime, the mode it finished in, the final figures (the job's result and its
`migration.completed` event).

The source's job-completed event carries them for pre- and post-copy (worker/libvirt_events.py);
when it does not come in time (no event loop in this process, a lost event) the destination's
completed statistics serve for a pre-copy migration. After post-copy the destination has no
downtime to give: the result then says it is unknown rather than guessing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any

import libvirt

from config.events import get_logger
from jobs.keys import POSTCOPY_FIELD
from jobs.model import Job
from jobs.record import FiguresSource, MigrationFigures, MigrationMode
from worker import switch_asked
from worker.libvirt_events import CompletionWatch
from worker.libvirt_host import LibvirtError, LibvirtUnavailable
from worker.runtime import Runtime

log = get_logger()

# libvirt's typed parameter names (VIR_DOMAIN_JOB_*) -> MigrationFigures fields.
_FIGURES = {
    "time_elapsed": "time_elapsed_ms",
    "setup_time": "setup_time_ms",
    "data_total": "data_total",
    "data_processed": "data_processed",
    "data_remaining": "data_remaining",
    "memory_total": "memory_total",
    "memory_processed": "memory_processed",
    "memory_bps": "memory_bps",
    "memory_dirty_rate": "memory_dirty_rate",
    "memory_iteration": "memory_iteration",
    "memory_postcopy_requests": "memory_postcopy_requests",
    "disk_total": "disk_total",
    "disk_processed": "disk_processed",
    "auto_converge_throttle": "auto_converge_throttle",
}


@dataclass(frozen=True)
class Landing:
    """The completed migration as libvirt told it (all None when nobody could tell)."""

    downtime_ms: int | None = None
    mode: MigrationMode | None = None
    final: MigrationFigures | None = None
    figures_from: FiguresSource | None = None
    paused_before_switch_ms: int | None = None  # counted in downtime_ms

    def result_fields(self) -> dict[str, Any]:
        """What goes into the job's result (only what is known)."""
        fields: dict[str, Any] = {
            "downtime_ms": self.downtime_ms,
            "mode": self.mode,
            "paused_before_switch_ms": self.paused_before_switch_ms,
        }
        if self.final is not None:
            fields["final"] = self.final.model_dump(mode="json", exclude_none=True)
            fields["figures_from"] = self.figures_from
        return {k: v for k, v in fields.items() if v is not None}

    def event_fields(self) -> dict[str, Any]:
        """The `migration.completed` event's figures: the same, flat."""
        flat = self.result_fields()
        final: dict[str, Any] = flat.pop("final", {})
        return flat | final


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def parse_completed(stats: dict[str, Any], source: FiguresSource, switched: bool) -> Landing:
    """A Landing from libvirt's completed statistics; `switched`: drover or libvirt said the
    migration went to post-copy (pages faulted in by the destination say so too)."""
    figures = MigrationFigures.model_validate(
        {field: _int(stats.get(name)) for name, field in _FIGURES.items()}
    )
    postcopy = switched or bool(figures.memory_postcopy_requests)
    return Landing(
        downtime_ms=_int(stats.get("downtime")),
        mode="postcopy" if postcopy else "precopy",
        final=figures,
        figures_from=source,
    )


def with_pause_before_switch(found: Landing, paused_ms: int | None) -> Landing:
    """`found` with the guest's pause before the switch to post-copy counted in its downtime
    (libvirt's post-copy downtime runs from the switch only; CompletionWatch). The sum may
    count the switch's own stop of an already paused guest twice: a few milliseconds."""
    if found.mode != "postcopy" or found.downtime_ms is None or paused_ms is None:
        return found
    return replace(
        found, downtime_ms=found.downtime_ms + paused_ms, paused_before_switch_ms=paused_ms
    )


def destination_stats(rt: Runtime, job: Job) -> dict[str, Any] | None:
    """The destination's completed statistics of the migration (libvirt keeps them on the
    domain that arrived), or None when it cannot say."""
    spec = job.spec
    try:
        uri = rt.settings.host(spec.dst).peer_uri
        with rt.libvirt.peer_domain(uri, spec.arrives_as) as dom:
            if dom is None:
                return None
            stats: dict[str, Any] = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except (LibvirtError, LibvirtUnavailable) as exc:
        log.warning("migration.figures_unavailable", error=str(exc)[:200])
        return None
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    return stats


def landing(rt: Runtime, job: Job, watch: CompletionWatch | None) -> Landing:
    """How the job's migration finished: the job-completed event's statistics (waited for
    up to tunables.completion_event_wait), else the destination's; `watch` is closed."""
    switched = rt.store.field(job.id, POSTCOPY_FIELD) is not None
    asked = switch_asked.taken(job.id)
    try:
        if watch is not None:
            stats = watch.wait(rt.settings.tunables.completion_event_wait)
            switched = switched or watch.postcopy
            if stats is not None:
                found = parse_completed(stats, "job-completed event", switched)
                paused_ms = watch.paused_before_switch_ms(asked)
                return with_pause_before_switch(found, paused_ms)
    finally:
        if watch is not None:
            with contextlib.suppress(LibvirtError):
                watch.close()
    stats = destination_stats(rt, job)
    if stats is None:
        return Landing(mode="postcopy" if switched else None)
    found = parse_completed(stats, "destination", switched)
    if found.mode == "postcopy":  # the destination's figures do not cover the switch-over
        return Landing(mode="postcopy", final=found.final, figures_from="destination")
    return found
