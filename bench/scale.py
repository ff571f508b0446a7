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
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

from history import fill_history, memory_per_job, used_memory
from scale_fleet import HOSTS, Fleet, fleet, host_name

from config.settings import load_settings
from jobs.admission import Admission
from jobs.host_facts import read_facts
from jobs.keys import ACTIVE_JOBS, CLUSTER_GATE
from jobs.states import JobState
from lab.synthetic_facts import publish_synthetic_facts, synthetic_fleet
from producer.api import Drover
from worker import cpu_compat
from worker.facts_placement import plan_from_facts
from worker.placement import Estimate

DEFAULT_JOBS = 10_000
DEFAULT_HISTORY = 100_000
BLOCK = 1_000
MS = 1000.0
P95 = 0.95
DESTINATIONS = 10  # per source host
LANE_STRIDE = 7  # how far a host's next job's destination is from its last one's
MEMORY_SAMPLE = 1_000  # finished jobs written to measure memory per job (and the small history)
CLI_RUNS = 5
JOBS_TARGET_MS = 300.0
PLAN_GUESTS, PLAN_SMALL_GUESTS, PLAN_SMALL_HOSTS = 1_000, 100, 20
PLAN_TARGET_MS = 2_000.0
PASS_TRIES = 10
PASS_TARGET_MS, HEARTBEAT_TARGET_MS = 20.0, 50.0
FACTS_TTL_S = 600.0  # the synthetic facts outlive the bench's planning
SKEW_S = 5.0
STARTUP_S, LINK_MIB_S = 2.0, 100.0  # the plan's estimate: QEMU start-up and the link's rate


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
    first_pass: tuple[float, float] = (0.0, 0.0)  # a pass at 1,000 waiting: idle, after a free

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
    """Job n's source and destination: each host sends to `DESTINATIONS` others in turn,
    so 10,000 jobs wait in 2,000 lanes of 5 (a drain spreads a host over several)."""
    src = n % HOSTS
    dst = (src + 1 + ((n // HOSTS) % DESTINATIONS) * LANE_STRIDE) % HOSTS
    if dst == src:
        dst = (dst + 1) % HOSTS
    return host_name(src), host_name(dst)


def submit_sweep(drover: Drover, jobs: int, report: Report) -> None:
    """Submit `jobs` jobs one after another; median and p95 per block of 1,000."""
    lanes = len({lane(n) for n in range(jobs)})
    print(f"submitting {jobs} jobs over {HOSTS} hosts in {lanes} lanes (no worker: all wait)")
    times: list[float] = []
    memory_before = used_memory(drover.store)
    for n in range(jobs):
        src, dst = lane(n)
        started = time.perf_counter()
        drover.submit(domain=f"guest-{n:05d}", src=src, dst=dst)
        times.append(ms_since(started))
        if n + 1 == BLOCK:  # the admission pass's baseline: the same pass at 1,000
            report.first_pass = pass_after_free_ms(drover)
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
    per_job = (used_memory(drover.store) - memory_before) / jobs
    report.add(Figure("Redis memory per waiting job", per_job, "bytes", "(sizing)", True))
    if not report.blocks:  # fewer jobs than one block: nothing to compare
        return
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
    admission_section(drover, report)
    heartbeat_section(drover, report)
    history_section(f, drover, args.history, report)
    plan_section(f, report)


def pass_after_free_ms(drover: Drover, tries: int = PASS_TRIES) -> tuple[float, float]:
    """One worker pass with nothing freed, and one right after a running job ends (its
    slots come free: the pass admits the next job behind them): medians of `tries`."""
    admission, settings = Admission(drover.store), drover.settings
    idle, freed = [], []
    for _ in range(tries):
        idle.append(timed(lambda: admission.pass_(settings, drover._start)))
        holder = sorted(admission.holders(CLUSTER_GATE))[0]
        drover.store.transition(holder, JobState.CANCELLED, host="bench", reason="bench")
        freed.append(timed(lambda: admission.pass_(settings, drover._start)))
    return statistics.median(idle), statistics.median(freed)


def admission_section(drover: Drover, report: Report) -> None:
    """A worker's admission pass at the full line, against the same at the first block."""
    live = cast(int, drover.store.r.scard(ACTIVE_JOBS))
    waiting = live - len(Admission(drover.store).holders(CLUSTER_GATE))
    idle, freed = pass_after_free_ms(drover)
    base_idle, base_freed = report.first_pass
    print(f"admission at about {waiting} waiting: a pass with nothing freed {idle:.2f} ms")
    report.add(
        Figure(
            "one admission pass after a slot frees",
            freed,
            "ms",
            "<= 20 ms",
            freed <= PASS_TARGET_MS,
            baseline=f"the same at {BLOCK} waiting ({base_freed:.2f} ms)",
            ratio=freed / base_freed,
        )
    )
    print(f"  (nothing freed at {BLOCK} waiting: {base_idle:.2f} ms)")
    started = time.perf_counter()
    Admission(drover.store).safety_pass(drover.settings, drover._start)
    print(f"  the rare safety pass (every lane's head): {ms_since(started):.0f} ms")


def heartbeat_section(drover: Drover, report: Report) -> None:
    """One heartbeat's renewal of the runner marks of every live job, batched, against the
    same marks renewed one call each (how a heartbeat did it before)."""
    ids = cast(set[str], drover.store.r.smembers(ACTIVE_JOBS))
    marks = [(job_id, "perform") for job_id in sorted(ids)]
    worker, ttl = "bench@scale", drover.settings.tunables.heartbeat_ttl
    drover.store.renew_runners(marks, worker, ttl)  # the marks exist from here on
    batched = statistics.median(
        timed(lambda: drover.store.renew_runners(marks, worker, ttl)) for _ in range(PASS_TRIES)
    )
    started = time.perf_counter()
    for job_id, phase in marks:
        drover.store.renew_runner(job_id, phase, worker, ttl)
    one_by_one = ms_since(started)
    report.add(
        Figure(
            f"heartbeat pass at {len(marks)} live jobs",
            batched,
            "ms",
            "<= 50 ms",
            batched <= HEARTBEAT_TARGET_MS,
            baseline=f"one call per mark ({one_by_one:.0f} ms)",
            ratio=batched / one_by_one,
        )
    )


def drover_jobs_ms(f: Fleet, runs: int = CLI_RUNS) -> tuple[float, float]:
    """`drover jobs` as an operator runs it (a new process each time): median and best."""
    cli = Path(sys.executable).parent / "drover"
    # Run where it is typed (no cli-server, cli/autostart.py): the listing's own cost at each
    # history size, with the same start-up in every figure, and no server left behind.
    env = {**os.environ, "DROVER_CONFIG": str(f.config), "DROVER_CLI_SERVER": "off"}
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([str(cli), "jobs"], env=env, check=True, capture_output=True)
        times.append(ms_since(started))
    return statistics.median(times), min(times)


def history_section(f: Fleet, drover: Drover, history: int, report: Report) -> None:
    """Redis memory per finished job, and `drover jobs` at a small and at a large history."""
    store, hosts = drover.store, [host_name(i) for i in range(HOSTS)]
    print(f"finished jobs: memory per job over {MEMORY_SAMPLE}, then history to {history}")
    per_job = memory_per_job(store, MEMORY_SAMPLE, hosts=hosts)
    report.add(Figure("Redis memory per finished job", per_job, "bytes", "(sizing)", True))
    small, small_best = drover_jobs_ms(f)
    print(f"  drover jobs at {MEMORY_SAMPLE} finished: {small:.0f} ms (best {small_best:.0f})")
    started = time.perf_counter()
    fill_history(store, history - MEMORY_SAMPLE, hosts=hosts)
    print(f"  filled in {time.perf_counter() - started:.0f} s", flush=True)
    large, best = drover_jobs_ms(f)
    report.add(
        Figure(
            f"drover jobs (whole command) at {history} finished, median",
            large,
            "ms",
            "<= 300 ms",
            large <= JOBS_TARGET_MS,
            baseline=f"the same at {MEMORY_SAMPLE}",
            ratio=large / small,
        )
    )
    print(f"  (best of {CLI_RUNS}: {best:.0f} ms)")


def plan_section(f: Fleet, report: Report) -> None:
    """Planning a drain of 1,000 guests over 200 hosts from published facts, cold cache."""

    def plan_ms(hosts: int, guests: int) -> float:
        synthetic = synthetic_fleet(hosts=hosts, guests=guests)
        publish_synthetic_facts(f.client, synthetic.facts, ttl_s=FACTS_TTL_S)
        cpu_compat.clear_cache()
        started = time.perf_counter()
        facts = read_facts(
            f.client, [x.host for x in synthetic.facts], max_age_s=FACTS_TTL_S, skew_s=SKEW_S
        )
        placements = plan_from_facts(
            synthetic.guests,
            synthetic.cpus,
            facts,
            Estimate(STARTUP_S, LINK_MIB_S),
            source_cpus=synthetic.source_cpus,
        )
        took = ms_since(started)
        placed = sum(1 for p in placements if p.destination is not None)
        print(f"  {guests} guests over {hosts} hosts: {took:.0f} ms ({placed} placed)")
        return took

    print("planning a drain from published facts (no libvirt connection)")
    small = plan_ms(PLAN_SMALL_HOSTS, PLAN_SMALL_GUESTS)
    large = plan_ms(HOSTS, PLAN_GUESTS)
    report.add(
        Figure(
            f"plan of {PLAN_GUESTS} guests over {HOSTS} hosts",
            large,
            "ms",
            "<= 2 s",
            large <= PLAN_TARGET_MS,
            baseline=f"{PLAN_SMALL_GUESTS} guests over {PLAN_SMALL_HOSTS} hosts",
            ratio=large / small,
        )
    )


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
