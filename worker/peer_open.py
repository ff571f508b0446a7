"""Another host's libvirtd, asked within a bound: its connection opened within
`tunables.peer_timeout`, and its answers on that connection kept to about the same bound by
libvirt's keepalive.

`libvirt.open` has no timeout of its own. Measured on the lab: to a host whose link is cut it
waits for the kernel's TCP connect (2 min 15 s); to a libvirtd that is frozen (stopped with
SIGSTOP, or stuck on a lock) it waits for ever, and so does every call on a connection opened
before the freeze, unless keepalive is on for that connection (then libvirt closes it after
interval x (count + 1) s and the call fails). The keeper asks peers between its other duties
(admitting jobs, recovering them, reporting the host, ending evacuations): one such peer
would stall every job this host has a part in, not only the ones that need that peer.

So the open runs in a thread of its own and the caller waits at most `peer_timeout`; then it
gets PeerUnanswered, which the seam (`LibvirtHost.reach`) says as LibvirtUnavailable, as for a
peer that refuses. The abandoned open is left to end by
itself and its connection, if one comes, is closed; until it ends, the same URI fails at once
instead of piling up threads behind it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import libvirt

# Keepalive messages a peer may leave unanswered before libvirt closes the connection.
KEEPALIVE_COUNT = 2
# The shortest keepalive interval libvirt accepts, in seconds.
MIN_KEEPALIVE_INTERVAL = 1

Opener = Callable[[str], libvirt.virConnect]


class PeerUnanswered(Exception):
    """The peer's libvirtd did not answer the open in time (or has not since an earlier try)."""


def keepalive_for(timeout: float) -> tuple[int, int]:
    """The keepalive (interval, count) that closes a connection to a silent peer after about
    `timeout` seconds: libvirt gives up after interval x (count + 1)."""
    interval = max(MIN_KEEPALIVE_INTERVAL, round(timeout / (KEEPALIVE_COUNT + 1)))
    return interval, KEEPALIVE_COUNT


def _in_thread(opener: Opener, uri: str) -> Future[libvirt.virConnect]:
    """`opener(uri)` in a daemon thread, its result or exception in the future returned."""
    pending: Future[libvirt.virConnect] = Future()

    def run() -> None:
        try:
            pending.set_result(opener(uri))
        except BaseException as exc:  # handed to the caller (or to `settled`), never lost
            pending.set_exception(exc)

    threading.Thread(target=run, name="peer-open", daemon=True).start()
    return pending


def _close(conn: libvirt.virConnect) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


class PeerOpener:
    """Opens other hosts' libvirtd within `timeout()` seconds (read at every open, as the
    config file may change), keepalive on; see the module docstring."""

    def __init__(self, opener: Opener, timeout: Callable[[], float]) -> None:
        self._opener = opener
        self._timeout = timeout
        self._lock = threading.Lock()
        # URI -> the monotonic times its abandoned opens started, while any is still open.
        self._unanswered: dict[str, list[float]] = {}

    def open(self, uri: str) -> libvirt.virConnect:
        """A connection to `uri` (the caller closes it). PeerUnanswered when the peer does not
        answer in time; the opener's own errors (libvirtError, a refused URI) as they are."""
        timeout = self._timeout()
        with self._lock:
            waiting = self._unanswered.get(uri)
            if waiting:
                silent_s = time.monotonic() - min(waiting)
                raise PeerUnanswered(f"its libvirtd has not answered for {silent_s:.0f}s")
        started = time.monotonic()
        pending = _in_thread(self._opener, uri)
        try:
            conn = pending.result(timeout=timeout)
        except TimeoutError:
            self._abandon(uri, started, pending)
            raise PeerUnanswered(f"no answer within {timeout:g}s") from None
        interval, count = keepalive_for(timeout)
        # Without an event loop running (tests, the lab's own tools) libvirt refuses
        # keepalive; those processes never wait on a peer for long.
        with contextlib.suppress(libvirt.libvirtError):
            conn.setKeepAlive(interval, count)
        return conn

    def unanswered(self) -> list[str]:
        """The URIs whose abandoned opens have not ended yet."""
        with self._lock:
            return sorted(self._unanswered)

    def _abandon(self, uri: str, started: float, pending: Future[libvirt.virConnect]) -> None:
        with self._lock:
            self._unanswered.setdefault(uri, []).append(started)

        def settled(done: Future[libvirt.virConnect]) -> None:
            with self._lock:
                times = self._unanswered.get(uri, [])
                with contextlib.suppress(ValueError):
                    times.remove(started)
                if not times:
                    self._unanswered.pop(uri, None)
            if done.exception() is None:
                _close(done.result())  # nobody waits for it any more

        pending.add_done_callback(settled)
