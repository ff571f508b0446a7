"""Turning jobs and events into lines and tables for people (the CLI's --json skips this).

Everything here comes from Redis, which is not trusted: lines are stripped of control
characters and table cells escaped for Rich markup as well (producer/text.py).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from rich.table import Table

from config.policy_model import EffectivePolicy, MigrationPolicy
from jobs.evacuation_model import DomainOutcome, Evacuation, Placement
from jobs.model import Job
from producer.text import cell, plain

MIB = 1024 * 1024
# A figure past this is no count of bytes drover wrote (and would not fit a float's range).
FIGURE_MAX = 2**63


def _clock(ts: Any) -> str:
    try:
        return datetime.fromisoformat(str(ts)).strftime("%H:%M:%S.%f")[:-3]
    except ValueError:
        return str(ts)


def figure(ev: dict[str, Any], key: str) -> int | None:
    """A count an event carries (bytes, bytes/s): 0 when it has none, None when it has one
    that is no number (Redis is not trusted: shown as unknown, never a crash)."""
    value = ev.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value) if abs(value) < FIGURE_MAX else None


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / MIB:.1f}"


def progress_text(ev: dict[str, Any]) -> str:
    total, done, remaining, bandwidth = (
        figure(ev, k)
        for k in ("data_total", "data_processed", "data_remaining", "memory_bandwidth")
    )
    pct = f"{100 * (total - remaining) / total:.0f}% " if total and remaining is not None else ""
    return (
        f"[{ev.get('stage')}] {pct}sent {_mib(done)} MiB of {_mib(total)} MiB, "
        f"remaining {_mib(remaining)} MiB, {_mib(bandwidth)} MiB/s, "
        f"dirty {ev.get('memory_dirty_rate')} pages/s, iteration {ev.get('memory_iteration')}"
    )


_DETAIL_KEYS = ("state", "reason", "duration_ms", "migration_ms", "memory_mib", "free_mib")
# How the migration went, as a person reads it first (the JSON form has every figure).
_COMPLETED_KEYS = ("migration_ms", "downtime_ms", "paused_before_switch_ms", "mode")


def event_line(ev: dict[str, Any]) -> str:
    """One line per event; print it with markup=False (it is stripped, not escaped)."""
    return plain(_event_line(ev))


def _event_line(ev: dict[str, Any]) -> str:
    name = str(ev.get("event"))
    host, phase = str(ev.get("host") or "-"), str(ev.get("phase") or "-")
    head = f"{_clock(ev.get('ts'))}  {host:<22} {phase:<20} {name}"
    if name == "migration.progress":
        return f"{head}  {progress_text(ev)}"
    details = " ".join(f"{k}={ev[k]}" for k in _DETAIL_KEYS if ev.get(k) is not None)
    if name.startswith("evacuation.child"):
        details = f"{ev.get('domain')} -> {ev.get('dst')} child={ev.get('child')} {details}"
    elif name == "evacuation.replanned":  # where it goes now (no host left: nowhere)
        moved = f"{ev.get('domain')}: {ev.get('was')} -> {ev.get('dst') or 'nowhere'}"
        details = f"{moved} {details}"
    elif name == "evacuation.planned" and isinstance(ev.get("placements"), list):
        placed = sum(1 for p in ev["placements"] if isinstance(p, dict) and p.get("destination"))
        details = f"{placed} of {len(ev['placements'])} domains placed"
    if name == "migration.completed":
        details = " ".join(f"{k}={ev[k]}" for k in _COMPLETED_KEYS if ev.get(k) is not None)
    if name == "policy.step":
        details = policy_step_text(ev)
    if name == "migration.started" and isinstance(ev.get("call"), dict):
        call = ev["call"]
        details = f"{call.get('api')} {_joined(call.get('flags', []), ' | ')} {call.get('params')}"
    return f"{head}  {details}".rstrip()


# What an operator's step (`by` = operator) carries instead of the policy's figures: the
# values a tune set, or what libvirt showed when force-complete acted (docs/events.md).
OPERATOR_FIGURES = (
    "bandwidth_mib",
    "postcopy_bandwidth_mib",
    "max_downtime_ms",
    "data_remaining",
    "memory_iteration",
    "memory_dirty_rate",
    "memory_bandwidth",
    "time_elapsed_ms",
)


def policy_step_text(ev: dict[str, Any]) -> str:
    """A policy decision as a line: the action, why, and the figures it looked at (an
    operator's step: the values it set, or what libvirt showed)."""
    if ev.get("by") == "operator":
        figures = " ".join(f"{k}={ev[k]}" for k in OPERATOR_FIGURES if ev.get(k) is not None)
    else:
        figures = (
            f"{ev.get('remaining_mib')} MiB left, {ev.get('dirty_mib_s', '-')} MiB/s dirtied, "
            f"{ev.get('transfer_mib_s')} MiB/s sent, pass {ev.get('iteration')}"
        )
    done = "" if ev.get("done", True) else _not_done(ev)
    allowed = f" -> {ev['downtime_ms']} ms" if ev.get("downtime_ms") is not None else ""
    skipped = f"; passed over {_joined(ev['skipped'], '; ')}" if ev.get("skipped") else ""
    return f"{ev.get('action')}{allowed}{done}: {ev.get('reason')} [{figures}]{skipped}"


def _not_done(ev: dict[str, Any]) -> str:
    """Why a step was not made: held for the operator's own (worker/job_locks.py), or
    libvirt's refusal (a held step showed as "libvirt refused: None")."""
    if ev.get("held_by") is not None:
        kept = ev.get("operator_downtime_ms")
        theirs = f": {kept} ms stands" if kept is not None else ""
        return f" (not made, held by the {ev['held_by']}{theirs})"
    return f" (libvirt refused: {ev.get('error')})"


def _joined(items: Any, sep: str) -> str:
    """A list an event carries, as text (anything else as it is: Redis is not trusted)."""
    return sep.join(str(i) for i in items) if isinstance(items, list) else str(items)


def add_row(table: Table, *cells: object) -> None:
    """A table row of untrusted values: each stripped and escaped (a cell is Rich markup)."""
    table.add_row(*(cell(c) for c in cells))


def jobs_table(jobs: list[Job | Evacuation]) -> Table:
    table = Table(title="drover jobs")
    for col in ("id", "kind", "state", "domain", "src", "dst", "duration", "downtime", "reason"):
        table.add_column(col)
    for job in jobs:
        s = job.summary()
        kind = "evacuation" if isinstance(job, Evacuation) else "migration"
        downtime = ""
        if isinstance(job, Job):
            kind = f"migration of {job.parent}" if job.parent else kind
            downtime = downtime_cell(job)
        add_row(
            table,
            s["id"],
            kind,
            s["state"],
            s["domain"],
            s["src"],
            s["dst"],
            "?" if s["duration_s"] is None else f"{s['duration_s']:.2f}s",
            downtime,
            s["reason"] or "",
        )
    return table


def downtime_cell(job: Job) -> str:
    """The guest's pause as libvirt measured it, and the mode it finished in (post-copy
    with no figure: libvirt gave none)."""
    r = job.result
    if r.downtime_ms is None:
        return r.mode or ""
    if r.mode != "postcopy":
        return f"{r.downtime_ms} ms"
    paused = r.paused_before_switch_ms
    of_it = f", {paused} ms of it paused before the switch" if paused is not None else ""
    return f"{r.downtime_ms} ms (postcopy{of_it})"


def plan_table(placements: list[Placement], title: str) -> Table:
    table = Table(title=cell(title))
    for col in ("domain", "destination", "memory", "estimate", "how", "group", "reason"):
        table.add_column(col)
    for p in placements:
        estimate = f"{p.estimate_s:.1f}s" if p.estimate_s is not None else "-"
        add_row(
            table,
            p.domain,
            p.destination or "-",
            f"{p.memory_mib} MiB",
            estimate + (f" ({p.convergence})" if p.convergence else ""),
            ("live" if p.active else "offline")
            + (f", {p.local_disks} local disk(s)" if p.local_disks else ""),
            p.group or "",
            p.reason or "",
        )
    return table


def policy_value(value: object) -> str:
    """A policy field as drover.toml spells it: lists comma-separated, no value as `-`."""
    if isinstance(value, tuple | list):
        return ", ".join(str(v) for v in value) or "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    return "-" if value is None else str(value)


def policy_table(policy: EffectivePolicy, title: str) -> Table:
    """Every field of a policy, its value and where that value came from."""
    table = Table(title=cell(title))
    for col in ("field", "value", "from"):
        table.add_column(col)
    for field in MigrationPolicy.model_fields:
        value = getattr(policy.values, field)
        add_row(table, field, policy_value(value), policy.sources.get(field, ""))
    return table


def policies_table(policies: dict[str, MigrationPolicy], defined_in: dict[str, str]) -> Table:
    """One column per policy, one row per field (`drover policies`)."""
    table = Table(title="drover policies")
    table.add_column("field")
    for name in policies:
        table.add_column(cell(f"{name} ({defined_in[name]})"))
    for field in MigrationPolicy.model_fields:
        add_row(table, field, *(policy_value(getattr(p, field)) for p in policies.values()))
    return table


def outcome_table(outcome: list[DomainOutcome], host: str) -> Table:
    table = Table(title=cell(f"where each domain is now (libvirt on {host} and its destination)"))
    for col in ("domain", "job", "job state", f"on {host}", "on destination", "reason"):
        table.add_column(col)
    for o in outcome:
        add_row(
            table,
            o.domain,
            o.job_id or "-",
            o.job_state or "-",
            "yes" if o.on_source else "no",
            destination_cell(o),
            o.reason or "",
        )
    return table


def destination_cell(o: DomainOutcome) -> str:
    """Where the domain is on its destination: the host and libvirt's state there (a guest
    moved shut off is only defined there, never "running"), or why nothing is known."""
    if o.running_on is not None:
        return f"{o.running_on} ({o.destination_state})" if o.destination_state else o.running_on
    return "unknown: not reachable" if o.destination_unreachable else "-"


def worker_cell(row: dict[str, Any]) -> str:
    """alive, draining (with what it still runs), or DEAD; and a config the worker refused."""
    parts = ["alive"] if row["worker_alive"] else []
    draining = row.get("draining")
    if draining:
        running = ", ".join(str(j) for j in draining.get("running", [])) or "nothing"
        parts.append(f"draining since {draining.get('since')} (running {running})")
    cell = "; ".join(parts) or "DEAD"
    if row.get("draining_unreadable"):  # written by hand: neither draining nor not is known
        cell += f"; draining mark unreadable: {row['draining_unreadable']}"
    if row.get("config_error"):
        cell += f"; CONFIG NOT LOADED: {row['config_error']}"
    return cell


def hosts_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="drover hosts")
    for col in ("host", "state", "worker", "free", "running", "out", "in", "cpu"):
        table.add_column(col)
    for r in rows:
        state = r["state"] + (f" ({r['disabled_reason']})" if r["disabled_reason"] else "")
        free = f"{r['free_mib']} MiB" if r["free_mib"] is not None else "?"
        running = r["running"]
        add_row(
            table,
            r["host"],
            state,
            worker_cell(r),
            free,
            f"{len(running)}: {', '.join(running)}" if running is not None else "?",
            str(r["migrations_out"]),
            str(r["migrations_in"]),
            str(r.get("cpu") or "?"),
        )
    return table
