"""Move a Linux guest with drover while pinging it: what the guest saw, beside libvirt's figure.

Used by the lab tests, bench/guest_downtime.py and the demo. The pinger runs from before the
job is submitted until after it has ended; the guest's agent is asked before and after, so a
caller can hold the disk writer's continuity (same boot, counter grown, log without gaps, no
write errors) against the move. A post-copy move is switched by the operator's command once
pre-copy is under way (a bandwidth cap keeps pre-copy open long enough), as `drover
postcopy JOB` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from jobs.model import Job
from lab.guest_probe import GuestStatus, Pinger, PingResult, status
from lab.proc import LabError
from producer.api import Drover

JOB_TIMEOUT_S = 180.0
# Pinging before the job and after it ends: replies on either side frame the gap.
PING_MARGIN_S = 0.3
# A post-copy move: pre-copy capped this low lasts seconds, time to switch while it runs.
POSTCOPY_PRECOPY_BANDWIDTH_MIB = 4
POSTCOPY_SWITCH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class GuestMove:
    """One move as the guest and libvirt saw it."""

    job: Job
    ping: PingResult
    before: GuestStatus
    after: GuestStatus

    @property
    def downtime_ms(self) -> int | None:
        """libvirt's own downtime figure (the job's completed statistics)."""
        return self.job.result.downtime_ms

    @property
    def longest_gap_ms(self) -> float:
        return self.ping.longest_gap_s * 1000

    def continuity_problems(self) -> list[str]:
        """What breaks the disk writer's continuity across the move (empty: none)."""
        problems = []
        if self.after.boot_id != self.before.boot_id:
            problems.append("the guest rebooted")
        if self.after.counter <= self.before.counter:
            problems.append(f"counter {self.before.counter} -> {self.after.counter}")
        if self.after.gaps or self.after.write_errors:
            problems.append(f"{self.after.gaps} gaps, {self.after.write_errors} write errors")
        if not self.after.writer:
            problems.append("the writer stopped")
        return problems


def _switch_to_postcopy(drover: Drover, job_id: str) -> None:
    """Once pre-copy copies, switch: the operator's `drover postcopy JOB`."""
    deadline = time.monotonic() + POSTCOPY_SWITCH_TIMEOUT_S
    while time.monotonic() < deadline:
        for e in drover.events(job_id):
            if e["event"] == "migration.progress" and e.get("stage") == "transfer":
                drover.start_postcopy(job_id)
                return
            if e["event"] == "job.state" and e.get("state") in ("succeeded", "failed"):
                return
        time.sleep(0.05)
    raise LabError(f"job {job_id}: pre-copy never reported progress to switch from")


def move(drover: Drover, guest: str, address: str, src: str, dst: str, **opts: Any) -> GuestMove:
    """Migrate `guest` live from `src` to `dst` with drover (`opts`: the job's options; with
    `postcopy=True` the move is switched to post-copy), pinging `address` all along."""
    postcopy = bool(opts.get("postcopy"))
    if postcopy:
        opts = {"bandwidth_mib": POSTCOPY_PRECOPY_BANDWIDTH_MIB, "policy": "manual"} | opts
    before = status(address)
    with Pinger(address) as pinger:
        time.sleep(PING_MARGIN_S)
        job_id = drover.submit(domain=guest, src=src, dst=dst, **({"live": True} | opts))
        if postcopy:
            _switch_to_postcopy(drover, job_id)
        job = drover.wait(job_id, timeout=JOB_TIMEOUT_S)
        time.sleep(PING_MARGIN_S)
        ping = pinger.stop()
    after = status(address) if job.state.value == "succeeded" else before
    return GuestMove(job=job, ping=ping, before=before, after=after)
