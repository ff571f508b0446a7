"""The guest's downtime as libvirt reports it, the same way for every tool that moved it.

Why from an event: after a post-copy migration the destination's `domjobinfo --completed`
shows no downtime, and the source's completed statistics are gone once something else asks
for them; the job-completed event (VIR_DOMAIN_EVENT_ID_JOB_COMPLETED) that the source's
libvirtd broadcasts to every connection carries the final statistics, `downtime` included,
whether virsh or a drover worker made the call. So the bench holds one connection of its own
to the source's libvirtd, with libvirt's default event loop running in a thread, and every
run takes the first outgoing migration's event that arrived after the run started.

libvirt's rule: the event loop must be registered before the connection is opened, so
`start_event_loop()` comes first (once per process).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import libvirt

_loop_started = False
_loop_lock = threading.Lock()


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (idempotent).

    Connections opened afterwards in this process deliver events (and keepalives); the
    thread lives as long as the process, as libvirt's loop cannot be unregistered.
    """
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


@dataclass(frozen=True)
class Completed:
    """One job-completed event: when it arrived (monotonic) and libvirt's statistics."""

    seq: int
    arrived: float
    stats: dict[str, Any]

    @property
    def downtime_ms(self) -> float | None:
        value = self.stats.get(libvirt.VIR_DOMAIN_JOB_DOWNTIME)
        return None if value is None else float(value)

    @property
    def outgoing(self) -> bool:
        """An outgoing migration's event (a host that was the destination reports one too);
        an event without the operation field counts as outgoing (older libvirt)."""
        op = self.stats.get(libvirt.VIR_DOMAIN_JOB_OPERATION)
        return op is None or op == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT


class JobCompletedListener:
    """Job-completed events of one domain on one libvirtd, in order of arrival."""

    def __init__(self, uri: str, domain: str) -> None:
        start_event_loop()
        self.domain = domain
        self._cond = threading.Condition()
        self._events: list[Completed] = []
        self._closed: str | None = None
        self.conn = libvirt.open(uri)
        self.conn.registerCloseCallback(self._on_close, None)
        self._cb = self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_event, None
        )

    def _on_event(
        self, _conn: libvirt.virConnect, dom: libvirt.virDomain, stats: dict[str, Any], _: Any
    ) -> None:
        if dom.name() != self.domain:
            return
        with self._cond:
            self._events.append(Completed(len(self._events) + 1, time.monotonic(), dict(stats)))
            self._cond.notify_all()

    def _on_close(self, _conn: libvirt.virConnect, reason: int, _: Any) -> None:
        with self._cond:
            self._closed = f"the event connection to libvirtd closed (reason {reason})"
            self._cond.notify_all()

    def mark(self) -> int:
        """Where the events stand now; `wait_outgoing(mark)` takes only later ones."""
        with self._cond:
            return len(self._events)

    def wait_outgoing(self, after: int, timeout: float) -> Completed | None:
        """The first outgoing migration's event after `after`, waiting up to `timeout` s;
        None if none came (a migration that did not complete sends none)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self._events[after:]:
                    if ev.outgoing:
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self._closed is not None:
                    return None
                self._cond.wait(left)

    @property
    def closed(self) -> str | None:
        return self._closed

    def close(self) -> None:
        try:
            self.conn.domainEventDeregisterAny(self._cb)
            self.conn.unregisterCloseCallback()
            self.conn.close()
        except libvirt.libvirtError:
            pass
