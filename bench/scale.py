"""drover's control plane at fleet scale: a SIMULATION, real Redis and real drover code.

Why this bench exists (issue 14): the job drover exists for at fleet scale is a rolling drain
of a 200-host fleet, 20 guests each, in one night: 4,000 migrations, and with retries and
schedules 10,000 jobs in line. This bench says whether the control plane stays flat that far.

What is real and what is not: a real `redis-server` (private port, AOF on), drover's own
producer API, admission, liveness, retention and planner code. What is simulated: the fleet.
The registry names 200 hosts with no worker and no libvirtd behind them, so every admitted
job waits for a worker that never comes, and the planner reads synthetic published facts.
No figure here is a migration's; bench/overhead.py and bench/evacuate.py measure those.

Each section prints its figures and, as its baseline measured in the same run, the same
figure at a small size (the first 1,000 submits, a pass at 1,000 waiting, ...), so the ratio
says whether cost grows with the line. It prints the issue's targets beside the figures and
never fails on them; it exits non-zero only when it could not measure.

    .venv/bin/python bench/scale.py [--jobs 10000] [--history 100000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from scale_fleet import HOSTS, Fleet, fleet, host_name

from config.settings import load_settings
from producer.api import Drover

DEFAULT_JOBS = 10_000
DEFAULT_HISTORY = 100_000
BLOCK = 1_000
MS = 1000.0
P95 = 0.95
LANE_STRIDE = 7  # job n goes from host n to host n*7+1: lanes spread over the whole fleet


def ms_since(started: float) -> float:
    return (time.perf_counter() - started) * MS


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return ms_since(started)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * P95))]


@dataclass
class Figure:
    what: str
    value: float
    unit: str
    target: str
    met: bool
    baseline: str = ""
    ratio: float | None = None


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    blocks: list[dict[str, float]] = field(default_factory=list)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        ratio = f"  ratio {figure.ratio:.2f} vs {figure.baseline}" if figure.ratio else ""
        met = "met" if figure.met else "NOT met"
        print(
            f"  {figure.what}: {figure.value:.1f} {figure.unit} "
            f"(target {figure.target}: {met}){ratio}",
            flush=True,
        )


def lane(n: int) -> tuple[str, str]:
    src = n % HOSTS
    dst = (n * LANE_STRIDE + 1) % HOSTS
    if dst == src:
        dst = (dst + 1) % HOSTS
    return host_name(src), host_name(dst)


def submit_sweep(drover: Drover, jobs: int, report: Report) -> None:
    """Submit `jobs` jobs one after another; median and p95 per block of 1,000."""
    print(f"submitting {jobs} jobs over {HOSTS} hosts (workers absent: every job waits)")
    times: list[float] = []
    for n in range(jobs):
        src, dst = lane(n)
        started = time.perf_counter()
        drover.submit(domain=f"guest-{n:05d}", src=src, dst=dst)
        times.append(ms_since(started))
        if (n + 1) % BLOCK == 0:
            block = times[-BLOCK:]
            row = {
                "waiting_after": float(n + 1),
                "median_ms": statistics.median(block),
                "p95_ms": p95(block),
            }
            report.blocks.append(row)
            print(
                f"  block ending at {n + 1:>6}: median {row['median_ms']:.2f} ms,"
                f" p95 {row['p95_ms']:.2f} ms",
                flush=True,
            )
    first, last = report.blocks[0], report.blocks[-1]
    median, tail = statistics.median(times), p95(times)
    report.add(Figure("submit median", median, "ms", "<= 10 ms", median <= 10))
    report.add(Figure("submit p95", tail, "ms", "<= 30 ms", tail <= 30))
    growth = last["median_ms"] / first["median_ms"]
    report.add(
        Figure(
            "last block's median",
            last["median_ms"],
            "ms",
            "within 1.5x of the first block",
            growth <= 1.5,
            baseline="the first 1,000 submits",
            ratio=growth,
        )
    )


def run(args: argparse.Namespace) -> Report:
    report = Report()
    with fleet() as f:
        os.environ["DROVER_CONFIG"] = str(f.config)
        drover = Drover(load_settings(f.config))
        submit_sweep(drover, args.jobs, report)
        measure_rest(f, drover, args, report)
    return report


def measure_rest(f: Fleet, drover: Drover, args: argparse.Namespace, report: Report) -> None:
    """The sections after the submit sweep (one admission pass, heartbeats, history, plan)."""
    del f, drover, args, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    parser.add_argument("--history", type=int, default=DEFAULT_HISTORY)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print("SIMULATION: real Redis and drover code; a synthetic 200-host fleet, no hypervisor")
    report = run(args)
    if args.json:
        print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
