"""Where a guest whose post-copy migration broke is, as libvirt says it on both hosts.

Read afresh before every decision of the post-copy recovery (worker/postcopy_recovery.py):
the source from this worker's own libvirtd, the destination from its libvirtd (the peer URI
in this worker's registry), with a time limit, because a destination whose link is cut does
not refuse a connection, it never answers one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from jobs.model import Job
from worker.libvirt_host import LibvirtError, LibvirtUnavailable
from worker.libvirt_states import StateReason, state_reason
from worker.phase_source import job_domain
from worker.runtime import Runtime


@dataclass(frozen=True)
class Whereabouts:
    """The guest on the source and on the destination: None where it is not defined;
    `reachable` False when the destination's libvirtd did not answer (its state unknown)."""

    domain: str
    src: str
    dst: str
    source: StateReason | None
    destination: StateReason | None
    reachable: bool

    @property
    def failed(self) -> bool:
        """A post-copy that broke, on either side: it needs VIR_MIGRATE_POSTCOPY_RESUME."""
        return any(s is not None and s.postcopy_failed for s in (self.source, self.destination))

    @property
    def in_postcopy(self) -> bool:
        """Part of a post-copy on either side, running or failed: nothing to roll back."""
        return any(s is not None and s.in_postcopy for s in (self.source, self.destination))

    @property
    def resumable(self) -> bool:
        """The source's libvirtd knows its post-copy failed (it accepts the resume) and the
        destination answers."""
        return self.reachable and self.source is not None and self.source.postcopy_failed

    @property
    def landed(self) -> bool:
        """Running (not paused, not hung) on the destination only."""
        arrived = self.reachable and self.destination is not None and self.destination.running
        gone = self.source is None or not self.source.active
        return arrived and gone and not self.failed

    def beyond_resume(self) -> str | None:
        """Why no resume can land the guest any more, as libvirt shows it (None while one
        can, or while the destination does not answer): a post-copy needs both halves, the
        destination's copy (the newest memory) and the source's (the pages not yet copied),
        and a resume is made on the source."""
        if not self.reachable or self.landed:
            return None
        if self.destination is None or not self.destination.active:
            # A copy destroyed (its QEMU killed) leaves a persistent definition shut off.
            shown = "has no" if self.destination is None else "shows a shut-off"
            return (
                f"{self.dst}'s copy is gone ({self.dst}'s libvirtd {shown} {self.domain}): the "
                "guest's newest memory went with it"
            )
        if self.source is None or not self.source.in_postcopy:
            return (
                f"{self.src}'s copy no longer takes part in the post-copy: the pages not yet "
                f"copied to {self.dst} went with it"
            )
        return None

    def describe(self) -> str:
        """One line: "dirty-1 is paused (post-copy failed) on lab1, running (post-copy
        failed) on lab2"."""
        return (
            f"{self.domain} is {_side(self.source, True)} on {self.src}, "
            f"{_side(self.destination, self.reachable)} on {self.dst}"
        )


def _side(found: StateReason | None, known: bool) -> str:
    if not known:
        return "unknown (its libvirtd does not answer)"
    return "not defined" if found is None else found.describe()


def locate(rt: Runtime, job: Job, answer_within: float) -> Whereabouts:
    """Where the job's guest is now, per libvirt on both hosts (the destination's answer
    waited for at most `answer_within` seconds)."""
    spec = job.spec
    dom = job_domain(rt, job, spec.domain)
    source = None
    if dom is not None:
        try:
            source = state_reason(dom)
        except LibvirtError:  # undefined since it was looked up (a transient guest left)
            source = None
    reachable, destination = _destination(rt, job, answer_within)
    return Whereabouts(spec.domain, spec.src, spec.dst, source, destination, reachable)


def _destination(rt: Runtime, job: Job, answer_within: float) -> tuple[bool, StateReason | None]:
    """(answered, the guest's state there): read on a thread of its own, so that a host
    whose link is cut (a TCP connect that waits for minutes) does not stop the recovery."""
    peer_uri = rt.settings.host(job.spec.dst).peer_uri
    answer: list[StateReason | None] = []

    def read() -> None:
        try:
            with rt.libvirt.peer_domain(peer_uri, job.spec.arrives_as) as dom:
                answer.append(None if dom is None else state_reason(dom))
        except (LibvirtUnavailable, LibvirtError):
            return

    reader = threading.Thread(target=read, name=f"locate-{job.id}", daemon=True)
    reader.start()
    reader.join(answer_within)
    if reader.is_alive() or not answer:
        return False, None
    return True, answer[0]
