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
import time
from collections.abc import Callable
from typing import Any

import libvirt

from config.events import get_logger
from worker.libvirt_host import Domain

log = get_logger()
_lock = threading.Lock()
# How libvirt announces the guest pausing while it migrates out: a pause asked during the
# migration (`virDomainSuspend`: force-complete, the policy's suspend step, `virsh suspend`)
# comes as MIGRATED, as does the stop of the switch itself (seen on the lab); PAUSED
# otherwise.
_PAUSED = (
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED,
)
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

    After post-copy, libvirt's downtime runs from the switch only: a guest paused before it
    (force-complete where post-copy was not yet allowed, the policy's suspend step, `virsh
    suspend`) was down from that pause. Measured on the lab: paused at 1.28 s, switched at
    4.38 s, and libvirt said 3 ms. So the moments of both, as libvirt announces them, are
    kept (`paused_before_switch_ms`). An ordinary switch's own stop is announced as a pause
    too, a few milliseconds before post-copy: only a pause announced before the switch was
    asked counts (worker/switch_asked.py).
    """

    def __init__(self, dom: Domain, clock: Callable[[], float] = time.monotonic) -> None:
        self.stats: dict[str, Any] | None = None
        self._clock = clock
        self.postcopy = False
        # Monotonic moments of libvirt's events: the guest paused while it migrates (on
        # request, or by its switch-over) and not resumed since, and the switch to post-copy.
        self.paused_at: float | None = None
        self.postcopy_at: float | None = None
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
        now = self._clock()
        if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
            if detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY:
                self.postcopy = True
                self.postcopy_at = self.postcopy_at or now
            elif detail in _PAUSED and self.postcopy_at is None:
                self.paused_at = self.paused_at or now
        elif event == libvirt.VIR_DOMAIN_EVENT_RESUMED and self.postcopy_at is None:
            self.paused_at = None  # resumed before the switch: that pause ended there

    def paused(self) -> bool:
        """Whether libvirt announced the guest paused (by its migration's switch-over or on
        request) and not resumed since: what the monitor's late report needs, answered
        without asking libvirt, which holds its answers back during the switch-over."""
        return self.paused_at is not None

    def paused_before_switch_ms(self, switch_asked: float | None) -> int | None:
        """How long the guest was paused before libvirt switched to post-copy: from a pause
        libvirt announced before the switch was asked (`switch_asked`, this process's
        monotonic clock; worker/switch_asked.py) to libvirt's announcement of post-copy.
        None: no such pause, no switch, or the switch's moment is not known here."""
        if self.paused_at is None or self.postcopy_at is None or switch_asked is None:
            return None
        if self.paused_at >= switch_asked:
            return None  # the switch's own stop
        return round((self.postcopy_at - self.paused_at) * 1000)

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
