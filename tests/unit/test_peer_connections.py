"""Another host's libvirtd is asked on a connection kept from one question to the next, and a
kept connection that died (its libvirtd restarted) costs the question nothing: it is asked
again on a fresh one. Scripted connections stand in for the peer's (the lab's phases use
real ones)."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from tests.support.libvirt_errors import libvirt_error
from worker.libvirt_host import LibvirtHost, LibvirtUnavailable, UnsafeURI

OWN_URI = "test:///default"
PEER_URI = "qemu+tcp://kvm2/system"
BROKEN_PIPE = "Cannot write data: Broken pipe"


class Peer:
    """A scripted peer connection that knows one domain, `idle-1`."""

    def __init__(self) -> None:
        self.alive = True
        self.restarted = False  # its libvirtd restarted: every call fails, though "alive"
        self.closed = False
        self.lookups = 0

    def setKeepAlive(self, interval: int, count: int) -> int:
        return 0

    def isAlive(self) -> int:
        return 1 if self.alive and not self.closed else 0

    def lookupByName(self, name: str) -> str:
        self.lookups += 1
        if self.restarted or self.closed:
            raise libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, BROKEN_PIPE)
        if name != "idle-1":
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"no domain '{name}'")
        return f"domain {name}"

    def lookupByUUIDString(self, uuid: str) -> str:
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"no domain with uuid {uuid}")

    def close(self) -> int:
        self.closed = True
        return 0


class Opener:
    def __init__(self) -> None:
        self.peers: list[Peer] = []
        self.refuse = False

    def __call__(self, uri: str) -> Peer:
        if self.refuse:
            raise libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, "Connection refused")
        peer = Peer()
        self.peers.append(peer)
        return peer


def looked_up(host: LibvirtHost, name: str = "idle-1", uri: str = PEER_URI) -> object:
    with host.peer_domain(uri, name) as dom:
        return dom


@pytest.fixture
def opener() -> Opener:
    return Opener()


@pytest.fixture
def host(opener: Opener) -> LibvirtHost:
    return LibvirtHost(OWN_URI, opener=opener, peer_timeout=lambda: 5.0)


def test_questions_to_a_peer_share_one_connection(host: LibvirtHost, opener: Opener) -> None:
    assert looked_up(host) == "domain idle-1"
    assert looked_up(host, "gone") is None  # libvirt's "no such domain" is an answer
    assert host.peer_facts(PEER_URI, "00000000-0000-0000-0000-0000000000aa") is None
    assert len(opener.peers) == 1 and not opener.peers[0].closed
    host.close()
    assert opener.peers[0].closed


def test_a_connection_whose_libvirtd_restarted_is_replaced_within_the_question(
    host: LibvirtHost, opener: Opener
) -> None:
    """A restarted libvirtd leaves the kept connection looking alive until a call fails."""
    looked_up(host)
    opener.peers[0].restarted = True
    assert looked_up(host) == "domain idle-1"
    assert len(opener.peers) == 2 and opener.peers[0].closed and not opener.peers[1].closed
    assert looked_up(host) == "domain idle-1" and opener.peers[1].lookups == 2


def test_a_connection_libvirt_calls_dead_is_not_asked(host: LibvirtHost, opener: Opener) -> None:
    looked_up(host)
    opener.peers[0].alive = False
    assert looked_up(host) == "domain idle-1"
    assert opener.peers[0].lookups == 1 and opener.peers[0].closed


def test_a_peer_that_is_down_is_unreachable_and_asked_anew_next_time(
    host: LibvirtHost, opener: Opener
) -> None:
    looked_up(host)
    opener.peers[0].restarted = True
    opener.refuse = True  # down for good: the fresh open fails as any open did before
    with pytest.raises(LibvirtUnavailable, match=r"cannot reach .*Connection refused"):
        looked_up(host)
    assert opener.peers[0].closed
    opener.refuse = False
    assert looked_up(host) == "domain idle-1" and len(opener.peers) == 2


def test_a_fresh_connection_that_fails_is_not_kept_nor_asked_twice(
    host: LibvirtHost, opener: Opener
) -> None:
    """Only a kept connection may be stale: a fresh one's connection error is the answer
    (unreachable), and the next question opens again."""

    def failing(uri: str) -> Peer:
        peer = Opener.__call__(opener, uri)
        peer.restarted = True
        return peer

    flaky = LibvirtHost(OWN_URI, opener=failing, peer_timeout=lambda: 5.0)
    with pytest.raises(LibvirtUnavailable, match=BROKEN_PIPE):
        looked_up(flaky)
    assert len(opener.peers) == 1 and opener.peers[0].closed
    assert opener.peers[0].lookups == 1


def test_the_allowlists_are_checked_at_every_question(
    config: Path, monkeypatch: pytest.MonkeyPatch, opener: Opener
) -> None:
    """As at every open: a URI the registry no longer allows is refused on a kept one too."""
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    host = LibvirtHost(OWN_URI, peer_timeout=lambda: 5.0)  # the worker's own opener
    host.kept_peers._kept["qemu+ext:///system?command=/bin/true"] = opener("x")
    with pytest.raises(UnsafeURI):
        looked_up(host, uri="qemu+ext:///system?command=/bin/true")
    assert opener.peers[0].lookups == 0


def test_a_frozen_peer_is_unreachable_not_asked_again(host: LibvirtHost, opener: Opener) -> None:
    """A frozen libvirtd: keepalive closes the kept connection and the call fails with an
    internal error (as libvirt says it on the lab). A fresh open would wait on that daemon
    again, so it is the answer: unreachable, for the phase to retry (a probe: it failed the
    job "unexpectedly"), and the closed connection is not kept."""
    looked_up(host)
    frozen = opener.peers[0]

    def keepalive_gave_up(name: str) -> str:
        frozen.alive = False  # libvirt closed it
        raise libvirt_error(
            libvirt.VIR_ERR_INTERNAL_ERROR,
            "internal error: connection closed due to keepalive timeout",
        )

    frozen.lookupByName = keepalive_gave_up  # type: ignore[method-assign]
    with pytest.raises(LibvirtUnavailable, match=r"cannot reach .*keepalive timeout"):
        looked_up(host)
    assert len(opener.peers) == 1 and frozen.closed  # not reopened within the question
    assert looked_up(host) == "domain idle-1" and len(opener.peers) == 2  # thawed: anew


def test_resetting_this_hosts_connection_keeps_the_peers(host: LibvirtHost, opener: Opener) -> None:
    """One job's error on this host's libvirtd resets this host's connection; another job
    may be reading from a peer's at that moment (a probe): it stays."""
    looked_up(host)
    host.reset()
    assert not opener.peers[0].closed
    assert looked_up(host) == "domain idle-1" and len(opener.peers) == 1
