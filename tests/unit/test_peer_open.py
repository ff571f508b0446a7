"""Another host's libvirtd is asked within `peer_timeout`: one that never answers (a frozen
libvirtd, a cut link) is unreachable after that long, never a wait of minutes or for ever.

The first case opens a real libvirt connection to a socket that accepts and never answers,
as a frozen libvirtd's does; the others hand the seam scripted openers to time each step.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from tests.conftest import free_port
from tests.support.libvirt_errors import libvirt_error
from worker.libvirt_host import LibvirtHost, LibvirtUnavailable, UnsafeURI
from worker.peer_open import KEEPALIVE_COUNT, keepalive_for

OWN_URI = "test:///default"
PEER_URI = "qemu+tcp://kvm2/system"
SHORT_S = 0.3  # the peer_timeout of these cases
DEADLINE_S = 10.0  # how long a case polls for what it waits to see


def eventually(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Peer:
    """A scripted peer connection: what the seam asked of it."""

    def __init__(self) -> None:
        self.keepalive: tuple[int, int] | None = None
        self.closed = False

    def setKeepAlive(self, interval: int, count: int) -> int:
        self.keepalive = (interval, count)
        return 0

    def close(self) -> int:
        self.closed = True
        return 0


class Opener:
    """Opens scripted peers, each only once `answer` is set; counts the opens asked."""

    def __init__(self) -> None:
        self.answer = threading.Event()
        self.asked = 0
        self.peers: list[Peer] = []

    def __call__(self, uri: str) -> libvirt.virConnect:
        self.asked += 1
        self.answer.wait()
        peer = Peer()
        self.peers.append(peer)
        return peer  # the part of a virConnect the seam uses (libvirt's classes are untyped)


def seam(opener: Callable[[str], libvirt.virConnect], timeout: float = SHORT_S) -> LibvirtHost:
    return LibvirtHost(OWN_URI, opener=opener, peer_timeout=lambda: timeout)


@pytest.fixture
def silent_peer() -> Iterator[tuple[str, socket.socket]]:
    """A qemu+tcp URI whose port accepts connections (the kernel's backlog) and never
    answers on them, as a frozen libvirtd's; the listening socket, to close it."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port), backlog=8)
    yield f"qemu+tcp://127.0.0.1:{port}/system", listener
    listener.close()


def test_a_libvirtd_that_never_answers_is_unreachable_after_peer_timeout(
    config: Path, monkeypatch: pytest.MonkeyPatch, silent_peer: tuple[str, socket.socket]
) -> None:
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    uri, listener = silent_peer
    host = LibvirtHost(OWN_URI, peer_timeout=lambda: SHORT_S)  # the worker's own opener
    started = time.monotonic()
    with pytest.raises(
        LibvirtUnavailable, match=re.escape(f"cannot reach {uri}: no answer within 0.3s")
    ):
        host.peer_facts(uri, "00000000-0000-0000-0000-0000000000aa")
    assert time.monotonic() - started < DEADLINE_S
    assert host.peers.unanswered() == [uri]
    # The peer goes away for good: its abandoned open ends, and the next one is asked anew.
    listener.close()
    eventually(lambda: host.peers.unanswered() == [], "the abandoned open to end")
    with pytest.raises(LibvirtUnavailable, match="cannot reach") as refused:
        host.reach(uri)
    assert "answer" not in str(refused.value)


def test_an_unanswered_peer_is_not_asked_again_until_its_open_ends() -> None:
    """One thread per peer at most waits on a silent libvirtd; later asks fail at once. When
    the late answer comes, nobody waits for it: its connection is closed."""
    opener = Opener()
    host = seam(opener)
    with pytest.raises(LibvirtUnavailable, match=re.escape("no answer within 0.3s")):
        host.reach(PEER_URI)
    started = time.monotonic()
    with pytest.raises(LibvirtUnavailable, match="has not answered for"):
        host.reach(PEER_URI)
    assert time.monotonic() - started < SHORT_S
    assert opener.asked == 1
    opener.answer.set()
    eventually(lambda: bool(opener.peers) and opener.peers[0].closed, "the late one's close")
    eventually(lambda: host.peers.unanswered() == [], "the late open to be settled")
    conn = host.reach(PEER_URI)
    assert opener.asked == 2 and conn is opener.peers[1] and not opener.peers[1].closed


def test_a_peer_that_answers_gets_keepalive_to_the_same_bound() -> None:
    opener = Opener()
    opener.answer.set()
    conn = seam(opener, timeout=15.0).reach(PEER_URI)
    assert conn is opener.peers[0]
    assert opener.peers[0].keepalive == keepalive_for(15.0) == (5, KEEPALIVE_COUNT)


@pytest.mark.parametrize("timeout", [3.0, 4.0, 15.0, 60.0, 600.0])
def test_keepalive_gives_up_on_a_silent_peer_after_about_peer_timeout(timeout: float) -> None:
    interval, count = keepalive_for(timeout)
    assert interval >= 1 and abs(interval * (count + 1) - timeout) <= (count + 1) / 2


def test_a_refusing_peer_is_unreachable_at_once_and_not_held_as_unanswered() -> None:
    def refuses(uri: str) -> libvirt.virConnect:
        raise libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, "Connection refused")

    host = seam(refuses, timeout=60.0)
    started = time.monotonic()
    with pytest.raises(
        LibvirtUnavailable, match=re.escape(f"cannot reach {PEER_URI}: Connection refused")
    ):
        host.reach(PEER_URI)
    assert time.monotonic() - started < DEADLINE_S
    assert host.peers.unanswered() == []


def test_a_refused_uri_stays_refused_never_unreachable(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URI the registry does not allow is an error to say, not a peer to ask again later."""
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    with pytest.raises(UnsafeURI, match="refusing libvirt URI"):
        LibvirtHost(OWN_URI).reach("qemu+ext:///system?command=/bin/true")
