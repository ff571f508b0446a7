"""libvirt's domain events in the worker: the event loop, and a domain's migration end.

The Python bindings deliver events only when an event implementation is registered before a
connection is opened and a thread runs it. Connections opened afterwards then answer
libvirtd's keepalive messages (and may send their own: worker/peer_open.py), which someone
must service: so the loop is started by the worker
process itself (worker/main.py, worker/tasks.py), never when this module is imported, and
processes that import worker code without running it (tests, bench, the lab) keep plain
connections. Where the loop is not running, `CompletionWatch` registers nothing and perform
asks the destination instead (worker/completion.py).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import libvirt

from config.events import get_logger
from worker.libvirt_host import Domain

log = get_logger()
_lock = threading.Lock()
_running = threading.Event()


def start_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread (once
    per process). Call it before the process opens its libvirt connections."""
    with _lock:
        if _running.is_set():
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run, name="libvirt-events", daemon=True).start()
        _running.set()


def events_running() -> bool:
    return _running.is_set()


def _run() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as exc:  # one bad turn of the loop must not end it
            log.warning("libvirt.event_loop_error", error=exc.get_error_message())


class CompletionWatch:
    """The job-completed event of one domain's migration (its final statistics, downtime
    included), and whether libvirt announced the switch to post-copy, from just before the
    migration call until `close`.

    libvirt emits the job-completed event on the source for pre- and post-copy alike; its
    delivery is asynchronous, so it may arrive just after the call returned (`wait`).
    """

    def __init__(self, dom: Domain) -> None:
        self.stats: dict[str, Any] | None = None
        self.postcopy = False
        # Set at the end of every pass of pre-copy (libvirt's migration-iteration event): the
        # monitor samples then, rather than polling libvirt for it (worker/monitor.py).
        self.pass_ended = threading.Event()
        self._arrived = threading.Event()
        self._ids: list[int] = []
        self._conn = dom.connect()
        if not events_running():
            return
        try:
            self._ids.append(
                self._conn.domainEventRegisterAny(
                    dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_completed, None
                )
            )
            self._ids.append(
                self._conn.domainEventRegisterAny(
                    dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
            )
            self._ids.append(
                self._conn.domainEventRegisterAny(
                    dom, libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, self._on_pass, None
                )
            )
        except libvirt.libvirtError as exc:
            log.warning("libvirt.events_unavailable", error=exc.get_error_message())
            self.close()

    @property
    def registered(self) -> bool:
        return bool(self._ids)

    def _on_completed(self, _conn: Any, _dom: Any, params: dict[str, Any], _opaque: Any) -> None:
        self.stats = dict(params)
        self._arrived.set()

    def _on_pass(self, _conn: Any, _dom: Any, _iteration: int, _opaque: Any) -> None:
        self.pass_ended.set()

    def _on_lifecycle(self, _conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
        if (
            event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED
            and detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY
        ):
            self.postcopy = True

    def wait(self, timeout: float) -> dict[str, Any] | None:
        """The completed statistics, once the event has come (None after `timeout`)."""
        if not self.registered:
            return None
        self._arrived.wait(timeout)
        return self.stats

    def close(self) -> None:
        """Stop listening (idempotent; a dead connection has nothing left to deregister)."""
        ids, self._ids = self._ids, []
        for callback_id in ids:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(callback_id)
