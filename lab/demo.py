"""`drover demo` (what `make demo` runs): drover's main job, on the local lab, end to end.

Brings the lab up (three hosts, four idle guests and dirty-1 on lab1), live-migrates idle-1
around in three modes (peer-to-peer native, peer-to-peer tunnelled, managed direct) and
dirty-1 to lab2, each as the CLI would, moves the Linux guest linux-1 to lab2 while pinging
it (its longest ping gap beside libvirt's downtime: lab/demo_linux.py), then drains lab1 onto
lab2 and lab3 two at a time.
It shows every event as it happens, proves each outcome through libvirt on the hosts, prints
a summary, and tears the lab down again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import libvirt
from rich.console import Console
from rich.table import Table

from config.settings import load_settings
from lab import control
from lab.demo_linux import FLAGS as LINUX_FLAGS
from lab.demo_linux import move_linux_guest
from producer.api import Drover
from producer.follow import follow, follow_evacuation
from producer.render import plan_table
from producer.text import plain

# libvirt prints every error to stderr unless told otherwise; lookups here may miss on purpose.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

JOB_TIMEOUT_S = 300.0
DEMO_HOSTS = 3
DEMO_IDLE_GUESTS = 4
DEMO_LINUX_GUESTS = 1
EVACUATED = "lab1"
EVACUATION_PARALLEL = 2


@dataclass(frozen=True)
class Step:
    domain: str
    src: str
    dst: str
    flags: str  # as typed on the command line
    options: dict[str, Any] = field(default_factory=dict)  # the same, for the Python API
    why: str = ""

    def command(self) -> str:
        return f"drover migrate {self.domain} --from {self.src} --to {self.dst} {self.flags}"


STEPS = (
    Step(
        "idle-1",
        "lab1",
        "lab2",
        "--live --p2p",
        why="an idle 64 MiB guest; managed peer-to-peer, native transport",
    ),
    Step(
        "idle-1",
        "lab2",
        "lab1",
        "--live --p2p --tunnelled",
        {"transport": "tunnelled"},
        why="back again, the memory tunnelled through the libvirtd connection",
    ),
    Step(
        "idle-1",
        "lab1",
        "lab2",
        "--live --direct",
        {"control": "direct"},
        why="managed direct: lab1's worker is the libvirt client of both daemons",
    ),
    Step("idle-1", "lab2", "lab1", "--live --p2p", why="and home"),
    Step(
        "dirty-1",
        "lab1",
        "lab2",
        "--live --p2p --bandwidth 32",
        {"bandwidth_mib": 32},
        why="a guest rewriting 64 MiB of RAM ~20 times a second never converges in pre-copy "
        "over a 32 MiB/s link; drover's default policy sees it at the end of the first pass "
        "and switches to post-copy (policy.step)",
    ),
)


def where_running(status: dict[str, Any], domain: str) -> list[str]:
    found = []
    for host, info in status["hosts"].items():
        conn = libvirt.open(info["operator_uri"])
        try:
            try:
                if conn.lookupByName(domain).isActive():
                    found.append(host)
            except libvirt.libvirtError:
                pass
        finally:
            conn.close()
    return found


def run_demo(console: Console, keep: bool = False) -> bool:
    console.rule(
        f"drover demo: bringing up the lab ({DEMO_HOSTS} hosts, real libvirtd + QEMU, "
        f"{DEMO_IDLE_GUESTS + 1} guests and a Linux guest on lab1)"
    )
    state = control.up(DEMO_HOSTS, guests=DEMO_IDLE_GUESTS, linux_guests=DEMO_LINUX_GUESTS)
    ok = True
    try:
        status = control.status()
        for name, host in status["hosts"].items():
            console.print(
                f"  {name}: {host['address']}  worker pid {host['worker_pid']}  "
                f"virsh -c '{host['operator_uri']}'",
                markup=False,
                soft_wrap=True,
            )
        d = Drover(load_settings(state.config))
        summary = Table(title="drover demo: summary")
        for col in (
            "job",
            "domain",
            "route",
            "flags",
            "state",
            "migration",
            "job time",
            "libvirt says",
        ):
            summary.add_column(col)
        for step in STEPS:
            console.rule(f"{step.domain}: {step.src} -> {step.dst}")
            console.print(f"[dim]{step.why}[/dim]")
            console.print(f"$ {step.command()}", markup=False)
            job_id = d.submit(
                domain=step.domain, src=step.src, dst=step.dst, live=True, **step.options
            )
            job = follow(d, job_id, console, JOB_TIMEOUT_S)
            running = where_running(status, step.domain)
            verified = running == [step.dst]
            ok = ok and job.state.value == "succeeded" and verified
            said = f"running on {', '.join(running) or 'no host'}"
            console.print(
                plain(
                    f"{'OK' if verified else 'MISMATCH'}: libvirt shows {step.domain} {said}"
                    + (f"; job {job.state.value}: {job.reason}" if job.reason else "")
                ),
                markup=False,
            )
            summary.add_row(
                job.id,
                step.domain,
                f"{step.src} -> {step.dst}",
                step.flags,
                job.state.value,
                f"{job.result.migration_ms or 0:.0f} ms",
                _ms(job.duration_s),
                said,
            )
        for guest in state.linux_guests:  # moved off lab1 before the drain
            console.rule(f"{guest.name}: lab1 -> lab2")
            m = move_linux_guest(console, d, guest, "lab1", "lab2")
            running = where_running(status, guest.name)
            ok = ok and m.job.state.value == "succeeded" and running == ["lab2"]
            ok = ok and not m.continuity_problems()
            summary.add_row(
                m.job.id,
                guest.name,
                "lab1 -> lab2",
                LINUX_FLAGS,
                m.job.state.value,
                f"{m.job.result.migration_ms or 0:.0f} ms",
                _ms(m.job.duration_s),
                f"running on {', '.join(running) or 'no host'}; ping gap {m.longest_gap_ms:.0f} ms",
            )
        ok = _evacuation(console, d, status, summary) and ok
        console.print(summary)
    finally:
        if keep:
            console.print("lab left up: `drover lab down` removes it")
        else:
            console.rule("tearing the lab down")
            console.print("removed: " + ", ".join(control.down()), markup=False)
    return ok


def _evacuation(console: Console, d: Drover, status: dict[str, Any], summary: Table) -> bool:
    """Drain lab1: plan, children two at a time, every domain confirmed where it was placed."""
    console.rule(f"draining {EVACUATED} for maintenance")
    console.print(
        "[dim]the host's worker places each guest (memory, CPU, anti-affinity), disables "
        f"{EVACUATED}, and migrates at most {EVACUATION_PARALLEL} at a time[/dim]"
    )
    console.print(f"$ drover evacuate {EVACUATED} --max-parallel {EVACUATION_PARALLEL} --wait")
    spec = d.evacuation_spec(host=EVACUATED, max_parallel=EVACUATION_PARALLEL)
    ev = follow_evacuation(d, d.evacuate(spec), console, JOB_TIMEOUT_S)
    console.print(plan_table(ev.plan or [], f"plan for {EVACUATED}"))
    ok = ev.state.value == "drained" and bool(ev.plan)
    for placement in ev.plan or []:
        running = where_running(status, placement.domain)
        verified = running == [placement.destination]
        ok = ok and verified
        console.print(
            f"{'OK' if verified else 'MISMATCH'}: libvirt shows {placement.domain} running on "
            f"{', '.join(running) or 'no host'}"
        )
    summary.add_row(
        ev.id,
        f"{len(ev.plan or [])} guests",
        f"{EVACUATED} -> {', '.join(sorted({p.destination or '-' for p in ev.plan or []}))}",
        f"evacuate --max-parallel {EVACUATION_PARALLEL}",
        ev.state.value,
        "-",
        _ms(ev.duration_s),
        f"{EVACUATED} empty" if ev.state.value == "drained" else str(ev.reason),
    )
    d.set_host_enabled(EVACUATED, True)
    return ok


def _ms(seconds: float | None) -> str:
    """A record's duration in the summary ("?": its times contradict each other)."""
    return "?" if seconds is None else f"{seconds * 1000:.0f} ms"
