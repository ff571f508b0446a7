"""Other hosts' libvirtd, asked on a connection kept from one question to the next.

A phase that reads the guest from its other host (prepare reads the source's, a post-copy's
recovery the destination's) opened a connection for each question and closed it after: on
the lab that open was a sixth of prepare's own time (1.3-1.8 ms of 9-12 ms, the open's thread
included), and over TLS, as a fleet runs, each open is a handshake.

A kept connection can be dead without looking so: a libvirtd restarted since answers the next
call on it with a connection error (`Cannot write data: Broken pipe`), not before. Such a
question is asked once more, on a fresh connection, which is what the question would have
had before. A frozen libvirtd is another matter: keepalive closes the connection ("connection
closed due to keepalive timeout", within about peer_timeout of its last answer) and a fresh
open would wait on it again, so that error is the answer, as any other is; a connection
libvirt closed is not kept for the next question. Every open goes through
`LibvirtHost.reach` (worker/peer_open.py: bounded in time, keepalive on), and the URI is
checked again at every question, as at every open: the allowlists may have changed since.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

import libvirt

T = TypeVar("T")


def _alive(conn: libvirt.virConnect) -> bool:
    """Whether libvirt still calls `conn` open (a daemon restarted since may not show yet)."""
    try:
        return bool(conn.isAlive() == 1)
    except libvirt.libvirtError:
        return False


def _close(conn: libvirt.virConnect) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


class PeerConnections:
    """One kept connection per peer URI, shared by the worker's threads (libvirt's
    connections are thread-safe)."""

    def __init__(
        self,
        open_peer: Callable[[str], libvirt.virConnect],
        stale: Callable[[libvirt.libvirtError], bool],
        check: Callable[[str], object],
    ) -> None:
        """`open_peer` opens a connection (`LibvirtHost.reach`: bounded, its failures said as
        the host's); `stale` tells an error a fresh connection would not meet (its daemon
        restarted); `check` refuses a URI the allowlists no longer allow."""
        self._open = open_peer
        self._stale = stale
        self._check = check
        self._lock = threading.Lock()
        self._kept: dict[str, libvirt.virConnect] = {}

    def ask(self, uri: str, question: Callable[[libvirt.virConnect], T]) -> T:
        """`question(conn)` on the peer at `uri`: on the kept connection, and once more on a
        fresh one when its daemon restarted since (not when keepalive gave up on a frozen one:
        a fresh one would wait on it again). The opener's errors as they are."""
        self._check(uri)
        conn, fresh = self._connection(uri)
        try:
            return question(conn)
        except libvirt.libvirtError as exc:
            if not self._stale(exc) or fresh:
                self._forget_if_dead(uri, conn, exc)
                raise
            self.forget(uri, conn)
        conn, _ = self._connection(uri)
        try:
            return question(conn)
        except libvirt.libvirtError as exc:
            self._forget_if_dead(uri, conn, exc)
            raise

    def _forget_if_dead(
        self, uri: str, conn: libvirt.virConnect, exc: libvirt.libvirtError
    ) -> None:
        """After an error: a connection that failed as a dead one does, or that libvirt
        closed (keepalive gave up on a frozen peer), is not kept for the next question."""
        if self._stale(exc) or not _alive(conn):
            self.forget(uri, conn)

    def forget(self, uri: str, conn: libvirt.virConnect) -> None:
        """Close `conn` and stop keeping it (unless another thread already replaced it)."""
        with self._lock:
            if self._kept.get(uri) is conn:
                del self._kept[uri]
        _close(conn)

    def close(self) -> None:
        with self._lock:
            kept, self._kept = self._kept, {}
        for conn in kept.values():
            _close(conn)

    def _connection(self, uri: str) -> tuple[libvirt.virConnect, bool]:
        """The kept connection if libvirt still calls it alive, else a new one (kept); and
        whether it is new. Opened outside the lock: a slow peer holds up only its askers."""
        with self._lock:
            kept = self._kept.get(uri)
        if kept is not None:
            if _alive(kept):
                return kept, False
            self.forget(uri, kept)
        conn = self._open(uri)
        with self._lock:
            other = self._kept.setdefault(uri, conn)
        if other is not conn:  # another thread kept one meanwhile: use that one
            _close(conn)
        return other, other is conn
