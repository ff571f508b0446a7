"""The worker's one seam to libvirt: its own libvirtd's connection, peers', lookups, facts.

Only this module, its siblings `worker/host_memory.py` (a host's memory),
`worker/libvirt_states.py` (a domain's state and reason, as post-copy needs them) and
`worker/libvirt_events.py` (libvirt's event loop and a migration's events),
`worker/peer_open.py` (a peer's connection, opened within a bound),
`worker/peer_connections.py` (peers' connections kept), `worker/libvirt_errors.py` (what
an error means) and
`worker/migration_call.py` (the migration call itself) import libvirt;
the rest of the worker is handed a `LibvirtHost` (the runtime's) and uses what it and the
functions here offer, so that phases, recovery and evacuation planning run as well against
libvirt's own `test:///default` driver, without root (tests/unit/test_libvirt_seam.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias, TypeVar

import libvirt

from config.settings import current
from config.uris import check_libvirt_uri
from jobs.record import DomainFacts
from worker.libvirt_errors import is_connection_error as is_connection_error
from worker.libvirt_errors import is_gone as is_gone
from worker.libvirt_errors import is_stale_connection
from worker.peer_connections import PeerConnections
from worker.peer_open import PeerOpener, PeerUnanswered

KIB_PER_MIB = 1024
T = TypeVar("T")
# What the rest of the worker names without importing libvirt.
Domain: TypeAlias = libvirt.virDomain
Connection: TypeAlias = libvirt.virConnect
LibvirtError = libvirt.libvirtError
Opener: TypeAlias = Callable[[str], Connection]

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


def _quiet(_: Any, __: Any) -> None:
    """libvirt prints every error to stderr unless a handler is set; we raise them instead."""


libvirt.registerErrorHandler(_quiet, None)


class LibvirtUnavailable(Exception):
    pass


class UnsafeURI(Exception):
    """A libvirt URI this worker will not open or hand to libvirtd; one line."""


def checked_uri(uri: str) -> str:
    """`uri`, if the registry's allowlists allow it (config/uris.py); else UnsafeURI.

    Every URI is checked again where it is opened or given to libvirtd, whatever checked it
    before: a libvirt URI can run a program (`qemu+ext://...?command=`).
    """
    settings = current()
    try:
        return check_libvirt_uri(uri, settings.allowed_uri_schemes, settings.allowed_uri_params)
    except ValueError as exc:
        raise UnsafeURI(f"refusing libvirt URI: {exc}") from None


def open_checked(uri: str) -> libvirt.virConnect:
    """libvirt.open, for an allowed URI only."""
    return libvirt.open(checked_uri(uri))


def found(lookup: Callable[[str], Domain], key: str) -> Domain | None:
    """The domain a libvirt lookup names, None when libvirt says there is none (any other
    error is raised: it says nothing about the domain)."""
    try:
        return lookup(key)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def facts(dom: libvirt.virDomain) -> DomainFacts:
    state, max_kib, _, vcpus, _ = dom.info()
    return DomainFacts(
        name=dom.name(),
        uuid=dom.UUIDString(),
        state=STATE_NAMES.get(state, str(state)),
        active=bool(dom.isActive()),
        persistent=bool(dom.isPersistent()),
        memory_mib=max_kib // KIB_PER_MIB,
        vcpus=vcpus,
    )


def is_paused(dom: Domain) -> bool:
    state, _ = dom.state()
    return bool(state == libvirt.VIR_DOMAIN_PAUSED)


def list_domains(conn: Connection, *, active_only: bool = False) -> list[Domain]:
    flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE if active_only else 0
    return list(conn.listAllDomains(flags))


def metadata_element(dom: Domain, namespace: str) -> str | None:
    """The domain's metadata element in `namespace` (its XML), or None if it has none.

    Only libvirt's "no such metadata" means none: any other error (libvirtd gone, the domain
    gone) is raised, so that a guest's declared policy or anti-affinity group is never read
    as "not declared" and silently replaced by the defaults."""
    try:
        return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise


def cpu_incompatible(conn: Connection, virt_type: str, cpu_xml: str) -> bool:
    """Whether the host's hypervisor cannot run this CPU (virsh hypervisor-cpu-compare)."""
    result = conn.compareHypervisorCPU(None, None, None, virt_type, cpu_xml, 0)
    return bool(result == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE)


def dirty_rates_mib_s(conn: Connection) -> dict[str, float]:
    """Each domain's (by UUID) dirty rate in MiB/s, as libvirt last measured it: only for a
    domain whose calculation has run (`virsh domdirtyrate-calc`; none of its statistics
    otherwise). A driver without dirty-rate statistics reports none."""
    try:
        rows = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_DIRTYRATE, 0)
    except libvirt.libvirtError:
        return {}
    rates = {}
    for dom, stats in rows:
        measured = stats.get("dirtyrate.calc_status") == libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED
        if measured and "dirtyrate.megabytes_per_second" in stats:
            rates[dom.UUIDString()] = float(stats["dirtyrate.megabytes_per_second"])
    return rates


def _peer_timeout() -> float:
    return current().tunables.peer_timeout


class LibvirtHost:
    """A lazily opened, reopened-when-dead connection shared by the worker's threads, and the
    way to other hosts' libvirtd (`opener` opens any URI: checked against the registry's
    allowlists unless a test hands in another; a peer's within `peer_timeout()` seconds,
    worker/peer_open.py)."""

    def __init__(
        self,
        uri: str,
        opener: Opener = open_checked,
        peer_timeout: Callable[[], float] = _peer_timeout,
    ) -> None:
        self.uri = uri
        self.opener = opener
        self.peers = PeerOpener(opener, peer_timeout)
        # The allowlists are checked at every question on a kept connection too, unless a
        # test hands in its own opener (of URIs no registry allows).
        check = checked_uri if opener is open_checked else str
        self.kept_peers = PeerConnections(self.reach, is_stale_connection, check)
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()

    @property
    def conn(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is None or not self._conn.isAlive():
                try:
                    self._conn = self.opener(self.uri)
                except libvirt.libvirtError as exc:
                    raise LibvirtUnavailable(
                        f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}"
                    ) from None
            return self._conn

    def reset(self) -> None:
        """Forget this host's connection that failed; the next use opens a new one. The kept
        peers' are not this host's: another job may be reading from one (a probe)."""
        self._close_own()

    def reconnecting(
        self,
        fn: Callable[[], T],
        *,
        attempts: int,
        delay: float,
        on_retry: Callable[[str, int], object] = lambda _error, _attempt: None,
    ) -> T:
        """`fn()`, again on a fresh connection when the one it used has died, `attempts` times
        in all (`on_retry(error, attempt)` before each new try, `delay` seconds apart).

        A libvirtd restarted since this worker last used it leaves the shared connection
        looking alive until a call fails on it (`Cannot write data: Broken pipe`); `fn` must
        be safe to run again (it re-reads libvirt's state). The last error is raised.
        """
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except LibvirtUnavailable as exc:
                error = str(exc)
                if attempt >= attempts:
                    raise
            except libvirt.libvirtError as exc:
                if not is_connection_error(exc) or attempt >= attempts:
                    raise
                error = exc.get_error_message()
            self.reset()
            on_retry(error, attempt)
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def by_name(self, name: str) -> libvirt.virDomain | None:
        return found(self.conn.lookupByName, name)

    def by_uuid(self, uuid: str) -> libvirt.virDomain | None:
        return found(self.conn.lookupByUUIDString, uuid)

    def reach(self, uri: str) -> Connection:
        """A connection to another host's libvirtd (the caller closes it); unreachable:
        LibvirtUnavailable, which says nothing about its domains."""
        try:
            return self.peers.open(uri)
        except libvirt.libvirtError as exc:
            raise LibvirtUnavailable(f"cannot reach {uri}: {exc.get_error_message()}") from None
        except PeerUnanswered as exc:
            raise LibvirtUnavailable(f"cannot reach {uri}: {exc}") from None

    def peer_facts(self, uri: str, uuid: str) -> DomainFacts | None:
        """Another host's domain `uuid`, its facts there; None only when that libvirtd says
        it has no such domain. Unreachable, or lost mid-question: LibvirtUnavailable."""
        try:
            return self.kept_peers.ask(uri, lambda conn: facts(conn.lookupByUUIDString(uuid)))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise LibvirtUnavailable(f"{uri}: {exc.get_error_message()}") from None

    def on_peer(self, uri: str, uuid: str) -> DomainFacts | None:
        """`peer_facts`, None for unreachable too: for a caller that acts only on a copy
        libvirt shows (a guest's only running copy is never touched on hearsay)."""
        try:
            return self.peer_facts(uri, uuid)
        except LibvirtUnavailable:
            return None

    @contextlib.contextmanager
    def peer_domain(self, uri: str, name: str) -> Iterator[Domain | None]:
        """Another host's domain `name`, read from that host's libvirtd (None when not
        there), on the connection kept to it (worker/peer_connections.py). Unreachable:
        LibvirtUnavailable, so that a phase needing it is retried."""
        try:
            dom = self.kept_peers.ask(uri, lambda conn: found(conn.lookupByName, name))
        except libvirt.libvirtError as exc:
            if not is_connection_error(exc):
                raise
            raise LibvirtUnavailable(f"cannot reach {uri}: {exc.get_error_message()}") from None
        yield dom

    def close(self) -> None:
        self.kept_peers.close()
        self._close_own()

    def _close_own(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
