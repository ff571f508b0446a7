"""Hosts as an operator sees them: maintenance mode on and off, and the `drover hosts` rows."""

from __future__ import annotations

import socket
from typing import Any, cast

from config.settings import ConfigError, Settings
from jobs.admission import Admission, inbound_gate, outbound_gate
from jobs.errors import SubmitError
from jobs.keys import draining_key
from jobs.liveness import draining_info
from jobs.maintenance import Maintenance, reason_problem
from jobs.request_signing import signer_for
from jobs.store import JobStore


def producer_name() -> str:
    """How this producer names itself in records and events."""
    return f"producer@{socket.gethostname()}"


def set_host_enabled(
    settings: Settings, maintenance: Maintenance, host: str, enabled: bool, reason: str | None
) -> str:
    """Maintenance mode: a disabled host is never a destination; what happened, in one line."""
    try:
        settings.host(host)
    except ConfigError as exc:  # "unknown host ...", the name quoted as shown() quotes it
        raise SubmitError(str(exc)) from None
    if enabled:
        was = maintenance.enable(host, signer_for(settings.security), producer_name())
        return f"{host} enabled" if was else f"{host} was not disabled"
    problem = None if reason is None else reason_problem(reason)
    if problem is not None:
        raise SubmitError(problem)
    entry = maintenance.disable(host, reason or "maintenance", by=producer_name())
    return f"{host} disabled since {entry.since} ({entry.reason})"


def host_rows(
    settings: Settings, store: JobStore, maintenance: Maintenance, admission: Admission
) -> list[dict[str, Any]]:
    """Each registry host: maintenance, worker liveness, and its worker's last report."""
    disabled = maintenance.disabled()
    rows = []
    for name in sorted(settings.hosts):
        report = store.host_report(name)
        entry = disabled.get(name)
        raw_draining = cast(str | None, store.r.get(draining_key(name)))
        draining = draining_info(raw_draining)
        rows.append(
            {
                "host": name,
                "state": "disabled" if entry else "enabled",
                "disabled_reason": entry.reason if entry else None,
                "worker_alive": store.alive(name),
                # A worker in warm shutdown: since when, and the jobs it still runs.
                "draining": draining,
                # A draining mark no worker wrote (set by hand): shown, never read.
                "draining_unreadable": _unreadable(draining_key(name), raw_draining)
                if raw_draining is not None and draining is None
                else None,
                "config_error": report.get("config_error"),
                "migrations_out": len(admission.holders(outbound_gate(name))),
                "migrations_in": len(admission.holders(inbound_gate(name))),
                "free_mib": report.get("free_mib"),
                "running": _names(report.get("running")),
                # The hypervisor's host-model CPU per virt type, as its worker read it.
                "cpu": report.get("cpu"),
                "reported": report.get("ts"),
            }
        )
    return rows


# What `drover hosts` shows of a value no worker wrote: its start, never all of it.
_SHOWN = 60


def _unreadable(key: str, raw: str) -> str:
    shown = raw if len(raw) <= _SHOWN else raw[:_SHOWN] + "..."
    return f"{key} is not a mark a worker writes: {shown!r}"


def _names(value: Any) -> list[str] | None:
    """A report's running domains as text (shown as they are); None (unknown) for what is
    not a list, which no worker writes."""
    return [str(v) for v in value] if isinstance(value, list) else None
