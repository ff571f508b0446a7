"""Turning jobs and events into lines and tables for people (the CLI's --json skips this)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.table import Table

from jobs.model import Job

MIB = 1024 * 1024


def _clock(ts: Any) -> str:
    try:
        return datetime.fromisoformat(str(ts)).strftime("%H:%M:%S.%f")[:-3]
    except ValueError:
        return str(ts)


def progress_text(ev: dict[str, Any]) -> str:
    total = int(ev.get("data_total") or 0)
    done = int(ev.get("data_processed") or 0)
    remaining = int(ev.get("data_remaining") or 0)
    pct = f"{100 * (total - remaining) / total:.0f}% " if total else ""
    return (
        f"[{ev.get('stage')}] {pct}sent {done / MIB:.1f} MiB of {total / MIB:.1f} MiB, "
        f"remaining {int(ev.get('data_remaining') or 0) / MIB:.1f} MiB, "
        f"{int(ev.get('memory_bandwidth') or 0) / MIB:.1f} MiB/s, "
        f"dirty {ev.get('memory_dirty_rate')} pages/s, iteration {ev.get('memory_iteration')}"
    )


_DETAIL_KEYS = ("state", "reason", "duration_ms", "migration_ms", "memory_mib", "free_mib")


def event_line(ev: dict[str, Any]) -> str:
    name = str(ev.get("event"))
    host, phase = ev.get("host") or "-", ev.get("phase") or "-"
    head = f"{_clock(ev.get('ts'))}  {host:<22} {phase:<20} {name}"
    if name == "migration.progress":
        return f"{head}  {progress_text(ev)}"
    details = " ".join(f"{k}={ev[k]}" for k in _DETAIL_KEYS if ev.get(k) is not None)
    if name == "migration.started" and isinstance(ev.get("call"), dict):
        call = ev["call"]
        details = f"{call.get('api')} {' | '.join(call.get('flags', []))} {call.get('params')}"
    return f"{head}  {details}".rstrip()


def jobs_table(jobs: list[Job]) -> Table:
    table = Table(title="drover jobs")
    for col in ("id", "state", "domain", "src", "dst", "duration", "reason"):
        table.add_column(col)
    for job in jobs:
        s = job.summary()
        table.add_row(
            s["id"],
            s["state"],
            s["domain"],
            s["src"],
            s["dst"],
            f"{s['duration_s']:.2f}s",
            s["reason"] or "",
        )
    return table
