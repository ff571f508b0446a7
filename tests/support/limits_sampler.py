"""Watching migrations through libvirt itself, to show that drover's limits hold.

A thread polls every lab host's libvirtd and counts, per host, the migrations going out (a
domain with an active libvirt job on its source) and coming in (an incoming domain: paused
for migration, or one whose job statistics libvirt keeps on the source only). The maxima it
saw are what a test compares with the limits.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

import libvirt

SAMPLE_INTERVAL_S = 0.02
# libvirt's answer for job statistics asked on the destination of a migration.
STATS_ON_SOURCE_ONLY = libvirt.VIR_ERR_OPERATION_UNSUPPORTED


@dataclass
class Sample:
    outbound: Counter[str] = field(default_factory=Counter)
    inbound: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.outbound.values())


def _count(host: str, conn: libvirt.virConnect, sample: Sample) -> None:
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            state, reason = dom.state()
        except libvirt.libvirtError:
            continue  # gone between the listing and the look
        incoming = state == libvirt.VIR_DOMAIN_PAUSED and reason in (
            libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
            libvirt.VIR_DOMAIN_PAUSED_STARTING_UP,
        )
        try:
            job_type = dom.jobInfo()[0]
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == STATS_ON_SOURCE_ONLY:
                sample.inbound[host] += 1
            continue
        if job_type != libvirt.VIR_DOMAIN_JOB_NONE:
            sample.outbound[host] += 1
        elif incoming:
            sample.inbound[host] += 1


class LimitsSampler:
    """with LimitsSampler(uris) as s: ...  then s.max_outbound, s.max_inbound, s.max_total."""

    def __init__(self, uris: dict[str, str]) -> None:
        self.uris = uris
        self.max_outbound: Counter[str] = Counter()
        self.max_inbound: Counter[str] = Counter()
        self.max_total = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="limits-sampler", daemon=True)

    def _run(self) -> None:
        conns = {host: libvirt.open(uri) for host, uri in self.uris.items()}
        try:
            while not self._stop.is_set():
                sample = Sample()
                for host, conn in conns.items():
                    _count(host, conn, sample)
                for host in conns:
                    self.max_outbound[host] = max(self.max_outbound[host], sample.outbound[host])
                    self.max_inbound[host] = max(self.max_inbound[host], sample.inbound[host])
                self.max_total = max(self.max_total, sample.total)
                self.samples += 1
                self._stop.wait(SAMPLE_INTERVAL_S)
        finally:
            for conn in conns.values():
                conn.close()

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
