"""Watching migrations through libvirt itself, to show that drover's limits hold.

A thread polls every lab host's libvirtd and notes, with the time of each look, which guests
are migrating out (an active libvirt job on the source) and which are coming in (an incoming
domain: paused for migration, or one whose job statistics libvirt keeps on the source only).
Each guest's sightings make an interval per host and role; a sighting is a moment the guest
really was in flight, so an observed interval lies inside the true one and two observed
intervals that overlap prove two migrations at once. The maxima are therefore never more
than what happened: a limit shown exceeded was exceeded. (Counting a snapshot instead would
not be sound: one sweep over three hosts takes long enough to see a finished migration and
its successor "together".)
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from types import TracebackType

import libvirt

SAMPLE_INTERVAL_S = 0.02
# Sightings of one guest further apart than this belong to two migrations of it.
SAME_MIGRATION_GAP_S = 1.0
# libvirt's answer for job statistics asked on the destination of a migration.
STATS_ON_SOURCE_ONLY = libvirt.VIR_ERR_OPERATION_UNSUPPORTED
OUT, IN = "out", "in"

Interval = tuple[float, float]


def _role(dom: libvirt.virDomain) -> str | None:
    """OUT, IN, or None for a domain that is not migrating."""
    state, reason = dom.state()
    incoming = state == libvirt.VIR_DOMAIN_PAUSED and reason in (
        libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
        libvirt.VIR_DOMAIN_PAUSED_STARTING_UP,
    )
    try:
        job_type = dom.jobInfo()[0]
    except libvirt.libvirtError as exc:
        return IN if exc.get_error_code() == STATS_ON_SOURCE_ONLY else None
    if job_type != libvirt.VIR_DOMAIN_JOB_NONE:
        return OUT
    return IN if incoming else None


def intervals(times: list[float]) -> list[Interval]:
    """Consecutive sightings (no gap above SAME_MIGRATION_GAP_S) as [first, last] intervals."""
    out: list[Interval] = []
    for t in sorted(times):
        if out and t - out[-1][1] <= SAME_MIGRATION_GAP_S:
            out[-1] = (out[-1][0], t)
        else:
            out.append((t, t))
    return out


def max_overlap(spans: Iterable[Interval]) -> int:
    """The most intervals covering one instant (closed intervals)."""
    edges = sorted(e for a, b in spans for e in ((a, 0, 1), (b, 1, -1)))
    best = current = 0
    for _, _, delta in edges:
        current += delta
        best = max(best, current)
    return best


class LimitsSampler:
    """with LimitsSampler(uris) as s: ...  then s.max_outbound, s.max_inbound, s.max_total."""

    def __init__(self, uris: dict[str, str]) -> None:
        self.uris = uris
        # (uuid, host, role) -> times it was seen so
        self.sightings: dict[tuple[str, str, str], list[float]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="limits-sampler", daemon=True)

    def _look(self, host: str, conn: libvirt.virConnect) -> None:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                role = _role(dom)
                seen = time.monotonic()
                uuid = dom.UUIDString()
            except libvirt.libvirtError:
                continue  # gone between the listing and the look
            if role is not None:
                self.sightings.setdefault((uuid, host, role), []).append(seen)

    def _run(self) -> None:
        conns = {host: libvirt.open(uri) for host, uri in self.uris.items()}
        try:
            while not self._stop.is_set():
                for host, conn in conns.items():
                    self._look(host, conn)
                self.samples += 1
                self._stop.wait(SAMPLE_INTERVAL_S)
        finally:
            for conn in conns.values():
                conn.close()

    def _spans(self, host: str | None = None, role: str | None = None) -> list[Interval]:
        return [
            span
            for (_, h, r), times in self.sightings.items()
            if (host is None or h == host) and (role is None or r == role)
            for span in intervals(times)
        ]

    @property
    def max_outbound(self) -> Counter[str]:
        return Counter({h: max_overlap(self._spans(h, OUT)) for h in self.uris})

    @property
    def max_inbound(self) -> Counter[str]:
        return Counter({h: max_overlap(self._spans(h, IN)) for h in self.uris})

    @property
    def max_total(self) -> int:
        """Guests in flight at once anywhere (a guest seen at both ends counts once)."""
        by_guest: dict[str, list[float]] = {}
        for (uuid, _, _), times in self.sightings.items():
            by_guest.setdefault(uuid, []).extend(times)
        return max_overlap(span for times in by_guest.values() for span in intervals(times))

    def __enter__(self) -> LimitsSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
