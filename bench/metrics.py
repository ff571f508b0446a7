"""What a scrape of one worker's /metrics costs, with 8 migrations in flight (issue 15).

Why this bench exists: Prometheus scrapes every worker every few seconds, in the worker's own
process, beside its migrations; a scrape must stay cheap (target: at most 10 ms) and small (at
most 500 series with 8 migrations in flight). The worker's registry is fed the way a worker
feeds it: real events through the real structlog chain (config/events.py with the metrics
observer, worker/metrics_registry.py), from each job's phase start through realistic progress
samples (setup, then pre-copy passes over a 4 GiB guest, one job in post-copy), plus a history
of ended jobs so that every counter and histogram has series, and the host collector with a
report tick's snapshot. Then it scrapes that registry with `generate_latest` and over HTTP,
and, in the same run, a baseline: prometheus_client's own process, platform and GC collectors
alone (what any Python exporter costs). It also times one event through the chain with and
without the observer.

It prints figures and ratios and never fails on them: a benchmark is not a test.

    .venv/bin/python bench/metrics.py [--runs 500] [--in-flight 8] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import time
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)

from config import events
from config.settings_model import Host
from jobs.model import Job
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import now
from worker.job_end import ended_fields, job_context
from worker.metrics_exporter import serve
from worker.metrics_host import HostCollector, HostSnapshot
from worker.metrics_registry import WorkerMetrics
from worker.progress import Progress, Stage

HOST = "kvm1"
DESTINATIONS = ("kvm2", "kvm3", "kvm4")
TARGET_SCRAPE_MS = 10.0
MAX_SERIES = 500
MS_PER_S = 1000.0
GIB = 1024**3
PAGE = 4096
SAMPLES_PER_JOB = 30  # a 30 s migration's progress events
ENDED_JOBS = 200  # history: every outcome and mode has its counter and histograms
STALE_AFTER_S = 3600.0
HTTP_TIMEOUT_S = 10.0
MODES: tuple[dict[str, Any], ...] = (
    {},
    {"transport": "tunnelled"},
    {"control": "direct"},
    {"offline": True, "live": False, "persistent": True},
)
OUTCOMES = ("succeeded", "failed", "cancelled", "rolled_back")
PHASES = ("source_preflight", "destination_prepare", "perform", "finish", "confirm")


def job(n: int, **spec: Any) -> Job:
    moment = now()
    return Job(
        id=f"j-bench-{n:04d}",
        state=JobState.MIGRATING,
        created=moment - timedelta(seconds=60),
        updated=moment,
        admitted=moment - timedelta(seconds=45),
        spec=MigrationSpec(
            domain=f"guest-{n:04d}", src=HOST, dst=DESTINATIONS[n % len(DESTINATIONS)], **spec
        ),
    )


def emit(j: Job, phase: str | None, name: str, **fields: Any) -> None:
    with structlog.contextvars.bound_contextvars(**job_context(j, phase)):
        events.get_logger().info(name, **fields)


def stats(step: int) -> dict[str, Any]:
    """libvirt's statistics `step` seconds into pre-copy of a 4 GiB guest at ~1 GiB/s."""
    processed = min(step * GIB // 2, 4 * GIB)
    return {
        "time_elapsed": step * 1000,
        "data_total": 4 * GIB,
        "data_processed": processed,
        "data_remaining": max(4 * GIB - processed // 2, 0),
        "memory_bps": GIB,
        "memory_dirty_rate": 20_000 + step * 100,
        "memory_iteration": 1 + step // 5,
        "downtime": 300,
        "memory_page_size": PAGE,
    }


def feed(in_flight: int) -> None:
    """Ended jobs (counters, histograms), then `in_flight` migrations still running."""
    for n in range(ENDED_JOBS):
        j = job(n, **MODES[n % len(MODES)])
        for phase in PHASES:
            emit(j, phase, "phase.started")
            emit(j, phase, "phase.finished", duration_ms=float(100 + n))
        emit(j, "perform", "migration.completed", migration_ms=9000, downtime_ms=40 + n % 200)
        emit(j, "perform", "policy.step", action="raise_downtime", by="policy", done=True)
        outcome = OUTCOMES[n % len(OUTCOMES)]
        emit(j, "confirm", "job.state", state=outcome, **ended_fields(j))
    emit(job(0), "perform", "phase.duplicate", reason="already ran")
    emit(job(0), "perform", "phase.recovering", reason="lost worker")
    for n in range(ENDED_JOBS, ENDED_JOBS + in_flight):
        j = job(n)
        emit(j, "perform", "phase.started")
        emit(j, "perform", "migration.progress", **Progress.waiting("setup", 200, None).__dict__)
        for step in range(1, SAMPLES_PER_JOB):
            stage: Stage = "postcopy" if n % 8 == 0 and step > SAMPLES_PER_JOB // 2 else "transfer"
            sample = Progress.from_stats(stats(step), stage)
            emit(j, "perform", "migration.progress", **sample.as_event_fields())


def timed(fn: Callable[[], object], runs: int) -> dict[str, float]:
    took = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        took.append((time.perf_counter() - start) * MS_PER_S)
    took.sort()
    return {
        "median_ms": statistics.median(took),
        "p95_ms": took[min(int(len(took) * 0.95), len(took) - 1)],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def over_http(registry: CollectorRegistry, runs: int) -> dict[str, float]:
    port = free_port()
    entry = Host(
        name=HOST,
        peer_uri="qemu+tcp://192.0.2.1/system",
        migration_address="192.0.2.1",
        metrics_port=port,
    )
    server = serve(registry, entry)
    if server is None:
        raise SystemExit(f"bench: could not listen on 127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/metrics"

    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            return bytes(resp.read())

    try:
        get()  # warm-up: the first request opens the server's thread
        return timed(get, runs)
    finally:
        server.shutdown()
        server.server_close()


def series(registry: CollectorRegistry) -> int:
    text = generate_latest(registry).decode()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def chain_cost(runs: int) -> dict[str, float]:
    """One progress event through the chain (to an in-memory log), without and with the
    observer: what the metrics add to every event a worker emits."""
    j = job(9999)
    fields = Progress.from_stats(stats(3)).as_event_fields()
    figures: dict[str, float] = {}
    for label, observers in (("plain", []), ("observed", [WorkerMetrics(HOST, 60).observe])):
        events.configure(HOST, None, stream=io.StringIO(), observers=observers)
        with structlog.contextvars.bound_contextvars(**job_context(j, "perform")):
            emit_one = _emitter(events.get_logger(), fields)
            figures[label] = timed(emit_one, runs)["median_ms"]
    return figures


def _emitter(log: Any, fields: dict[str, Any]) -> Callable[[], object]:
    return lambda: log.info("migration.progress", **fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    metrics = WorkerMetrics(HOST, STALE_AFTER_S)
    snapshot = HostSnapshot(True, 2048, 12, {"in": 1, "out": 2}, {"in": 2, "out": 2}, False)
    metrics.registry.register(HostCollector(HOST, lambda: snapshot))
    events.configure(HOST, None, stream=io.StringIO(), observers=[metrics.observe])
    feed(args.in_flight)

    baseline = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        baseline.register(collector)
    worker = timed(lambda: generate_latest(metrics.registry), args.runs)
    base = timed(lambda: generate_latest(baseline), args.runs)
    worker_http = over_http(metrics.registry, args.runs)
    base_http = over_http(baseline, args.runs)
    chain = chain_cost(args.runs * 10)
    count = series(metrics.registry)
    result = {
        "in_flight": args.in_flight,
        "series": count,
        "baseline_series": series(baseline),
        "max_series": MAX_SERIES,
        "generate_latest": {"worker": worker, "baseline": base},
        "http": {"worker": worker_http, "baseline": base_http},
        "event_chain_ms": chain,
        "target_scrape_ms": TARGET_SCRAPE_MS,
        "errors": metrics.errors,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"worker registry: {args.in_flight} migrations in flight, {ENDED_JOBS} ended jobs")
    print(
        f"series: {count} (at most {MAX_SERIES}: {_verdict(count <= MAX_SERIES)}); "
        f"baseline collectors alone: {result['baseline_series']}"
    )
    for how, pair in (("generate_latest", (worker, base)), ("HTTP GET", (worker_http, base_http))):
        w, b = pair
        print(
            f"{how:16} worker median {w['median_ms']:.3f} ms p95 {w['p95_ms']:.3f} ms | "
            f"baseline median {b['median_ms']:.3f} ms p95 {b['p95_ms']:.3f} ms | "
            f"ratio {w['median_ms'] / b['median_ms']:.1f}x"
        )
    print(
        f"scrape at most {TARGET_SCRAPE_MS:.0f} ms (HTTP p95): "
        f"{_verdict(worker_http['p95_ms'] <= TARGET_SCRAPE_MS)}"
    )
    print(
        f"one event through the chain: {chain['plain'] * 1000:.1f} us without the observer, "
        f"{chain['observed'] * 1000:.1f} us with it "
        f"(+{(chain['observed'] - chain['plain']) * 1000:.1f} us)"
    )


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    main()
