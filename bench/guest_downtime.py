"""Downtime as a Linux guest's network sees it, beside libvirt's own figure, per mode.

A lab of its own (two hosts, TLS, one Linux guest whose disk is on the lab's shared storage:
lab/linux_lab.py) moves `linux-1` back and forth with drover in each mode (native p2p,
tunnelled p2p, TLS p2p, managed direct, post-copy), `--runs` times per mode, first with the
guest idle, then with its memory writer running (32 MiB copied over in its tmpfs again and
again, 100 ms apart). All along, the root namespace pings the guest every 10 ms
(lab/guest_probe.py): the longest gap between two replies is the downtime the guest's peers
saw. Beside it, libvirt's downtime from the job's completed statistics (the job's result, as
the `migration.completed` event gives it). Per mode and load it prints the medians of both,
and the lost pings.

Every move is checked: the job succeeded, libvirt shows the guest running on the destination
and not on the source, and the guest's disk writer carried on (same boot, counter grown, log
without gaps or write errors); its file system is checked (e2fsck -fn) at the end. It prints
figures and never fails on them; it exits non-zero only when it could not measure.

    .venv/bin/python bench/guest_downtime.py [--runs 5] [--lab-id 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import libvirt

from config.settings import load_settings
from lab import control, guest_probe
from lab.guest_move import GuestMove, move
from lab.proc import LabError
from producer.api import Drover

DEFAULT_LAB_ID = 5  # the benches' lab (bench/overhead.py)
DEFAULT_RUNS = 5
GUEST = "linux-1"
HOSTS = ("lab1", "lab2")
MODES: dict[str, dict[str, Any]] = {
    "native p2p": {},
    "tunnelled p2p": {"transport": "tunnelled"},
    "TLS p2p": {"tls": True},
    "managed direct": {"control": "direct"},
    "post-copy": {"postcopy": True},
}
LOADS = ("idle", "memwriter")

libvirt.registerErrorHandler(lambda *_: None, None)


class BenchError(Exception):
    pass


def note(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sample:
    mode: str
    load: str
    src: str
    dst: str
    longest_gap_ms: float
    libvirt_downtime_ms: int | None
    lost: int
    sent: int
    landed_as: str | None  # pre-copy or post-copy, as the job's result says


def running_on(status: dict[str, Any]) -> str:
    for name, host in status["hosts"].items():
        if any(d["name"] == GUEST and d["active"] for d in host["domains"]):
            return str(name)
    raise BenchError(f"{GUEST} runs nowhere")


def checked(m: GuestMove, mode: str, load: str) -> Sample:
    """The move as a sample, once libvirt and the guest say it went as it should."""
    job = m.job
    if job.state.value != "succeeded":
        raise BenchError(f"{mode} ({load}): job {job.id} {job.state.value}: {job.reason}")
    where = running_on(control.status())
    if where != job.spec.dst:
        raise BenchError(f"{mode} ({load}): libvirt shows {GUEST} on {where}, not {job.spec.dst}")
    problems = m.continuity_problems()
    if problems:
        raise BenchError(f"{mode} ({load}): the guest's disk writer: {'; '.join(problems)}")
    return Sample(
        mode=mode,
        load=load,
        src=job.spec.src,
        dst=job.spec.dst,
        longest_gap_ms=round(m.longest_gap_ms, 1),
        libvirt_downtime_ms=m.downtime_ms,
        lost=m.ping.lost,
        sent=m.ping.sent,
        landed_as=job.result.mode,
    )


def bench(runs: int) -> list[Sample]:
    state = control.up(2, tls=True, linux_guests=1)
    st = control.status()
    conn = libvirt.open(st["hosts"]["lab1"]["operator_uri"])
    try:
        conn.lookupByName("dirty-1").suspend()  # it would burn a core under the figures
    finally:
        conn.close()
    drover = Drover(load_settings(state.config))
    address = state.linux_guests[0].address
    samples: list[Sample] = []
    for load in LOADS:
        guest_probe.set_memwriter(address, load == "memwriter")
        for mode, opts in MODES.items():
            for i in range(runs):
                src = running_on(control.status())
                dst = HOSTS[1] if src == HOSTS[0] else HOSTS[0]
                s = checked(move(drover, GUEST, address, src, dst, **opts), mode, load)
                note(
                    f"{mode} ({load}) run {i + 1}/{runs}: {s.src}->{s.dst} gap "
                    f"{s.longest_gap_ms} ms, libvirt {s.libvirt_downtime_ms} ms, lost {s.lost}"
                )
                samples.append(s)
    guest_probe.set_memwriter(address, False)
    rc, out = guest_probe.fsck(address)
    if rc != 0:
        raise BenchError(f"the guest's file system is not clean after the moves: {out}")
    note("file system clean after every move (e2fsck -fn exit 0)")
    return samples


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def summarise(samples: list[Sample]) -> list[dict[str, Any]]:
    rows = []
    for load in LOADS:
        for mode in MODES:
            mine = [s for s in samples if s.mode == mode and s.load == load]
            downtimes = [float(s.libvirt_downtime_ms) for s in mine if s.libvirt_downtime_ms]
            rows.append(
                {
                    "mode": mode,
                    "load": load,
                    "runs": len(mine),
                    "median_longest_gap_ms": _median([s.longest_gap_ms for s in mine]),
                    "median_libvirt_downtime_ms": _median(downtimes),
                    "median_lost_pings": _median([float(s.lost) for s in mine]),
                    "landed_as": sorted({s.landed_as or "?" for s in mine}),
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]], runs: int) -> None:
    print(f"Linux guest downtime, ping every 10 ms from the root namespace; median of {runs}")
    print(f"{'mode':16} {'load':10} {'longest gap ms':>15} {'libvirt ms':>11} {'lost':>6}  landed")
    for r in rows:
        print(
            f"{r['mode']:16} {r['load']:10} {r['median_longest_gap_ms']!s:>15} "
            f"{r['median_libvirt_downtime_ms']!s:>11} {r['median_lost_pings']!s:>6}  "
            f"{','.join(r['landed_as'])}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    p.add_argument("--lab-id", type=int, default=DEFAULT_LAB_ID)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ["DROVER_LAB_ID"] = str(args.lab_id)
    os.environ.pop("DROVER_CONFIG", None)
    started = time.monotonic()
    control.down()
    try:
        samples = bench(args.runs)
    except (BenchError, LabError) as exc:
        print(f"guest_downtime: could not measure: {exc}", file=sys.stderr)
        return 1
    finally:
        control.down()
    rows = summarise(samples)
    if args.json:
        print(json.dumps({"rows": rows, "samples": [asdict(s) for s in samples]}, indent=2))
    else:
        print_table(rows, args.runs)
    note(f"{len(samples)} moves in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
