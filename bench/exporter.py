"""What one scrape of `drover exporter` costs on a big fleet: a SIMULATION, real Redis and code.

Why (issue 15): Prometheus scrapes the fleet exporter every 15 s or so, and every scrape
reads Redis. It must stay cheap on the fleet issue 14 sized: 10,000 jobs waiting and
100,000 finished. What is real: a `redis-server` (private port, AOF on), drover's own
submission, admission and history code (bench/history.py, as bench/scale.py uses), and a
real `drover exporter` process scraped over HTTP. What is simulated: the fleet (200 hosts
with no worker and no libvirtd behind them: every job admitted waits for a worker).

Figures, each the median of `--scrapes` scrapes, at each size on the way up (empty, 1,000
waiting, all waiting, then with the history): the collector's own time in this process (the
Redis reads and the series built from them) and a whole HTTP scrape of the exporter process.
The baseline, measured in the same run on the same Redis: one PING round trip. It prints
the figures and ratios and never fails on them.

    .venv/bin/python bench/exporter.py [--jobs 10000] [--history 100000] [--scrapes 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from history import fill_history
from scale import lane
from scale_fleet import HOSTS, Fleet, fleet, host_name

from config.settings import load_settings
from jobs.admission import Admission
from jobs.connection import client_for
from jobs.spec import MigrationSpec
from jobs.store import JobStore
from jobs.submission import enqueue
from lab.proc import wait_until
from producer.exporter_collector import FleetCollector

MS = 1000.0
PINGS = 200
SMALL = 1_000
START_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 30.0
REPO = Path(__file__).resolve().parents[1]


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * MS)
    return statistics.median(times)


class Exporter:
    """A real `drover exporter` on the bench's fleet, scraped over HTTP."""

    def __init__(self, f: Fleet, port: int) -> None:
        env = {**os.environ, "DROVER_CONFIG": str(f.config)}
        env.pop("DROVER_REDIS_URL", None)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "exporter", "--listen", f"127.0.0.1:{port}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: b"drover_exporter_active 1.0" in self.get(), START_TIMEOUT_S, "active")

    def get(self) -> bytes:
        try:
            with urllib.request.urlopen(self.url, timeout=HTTP_TIMEOUT_S) as response:
                return bytes(response.read())
        except OSError:
            return b""

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def fill_waiting(store: JobStore, start: int, stop: int) -> None:
    """Jobs `start`..`stop` in line through drover's own submission code, as bench/scale.py
    spreads them (2,000 lanes over 200 hosts)."""
    for n in range(start, stop):
        src, dst = lane(n)
        enqueue(store, MigrationSpec(domain=f"guest-{n:05d}", src=src, dst=dst), origin="bench")


def measure(
    label: str, collector: FleetCollector, exporter: Exporter, ping: float, runs: int
) -> dict[str, float | str]:
    collect = median_ms(lambda: list(collector.collect()), runs)
    http = median_ms(exporter.get, runs)
    series = sum(1 for line in exporter.get().splitlines() if not line.startswith(b"#"))
    print(
        f"  {label:<40} collect {collect:7.2f} ms ({collect / ping:6.1f} PINGs)"
        f"   HTTP scrape {http:7.2f} ms ({http / ping:6.1f} PINGs)   {series} series",
        flush=True,
    )
    return {"at": label, "collect_ms": collect, "http_ms": http, "series": series}


def run(args: argparse.Namespace) -> dict[str, object]:
    with fleet() as f:
        settings = load_settings(f.config)
        store = JobStore.from_settings(settings, retry_for=0)
        admission = Admission(store)
        timeout = settings.tunables.exporter_redis_timeout
        client = client_for(settings.redis_url, probe_timeout=timeout)
        collector = FleetCollector(lambda: settings, client, lambda: True)
        ping = median_ms(client.ping, PINGS)
        print(f"baseline: one PING round trip {ping * MS:.0f} us (median of {PINGS})")
        exporter = Exporter(f, port=_free_port())
        rows = []
        try:
            rows.append(measure("empty", collector, exporter, ping, args.scrapes))
            small = min(SMALL, args.jobs)
            fill_waiting(store, 0, small)
            admission.safety_pass(settings, lambda job_id, spec: None)
            rows.append(measure(f"{small} waiting", collector, exporter, ping, args.scrapes))
            fill_waiting(store, small, args.jobs)
            admission.safety_pass(settings, lambda job_id, spec: None)
            rows.append(measure(f"{args.jobs} waiting", collector, exporter, ping, args.scrapes))
            hosts = [host_name(i) for i in range(HOSTS)]
            fill_history(store, min(SMALL, args.history), hosts=hosts)
            label = f"{args.jobs} waiting + {min(SMALL, args.history)} finished"
            rows.append(measure(label, collector, exporter, ping, args.scrapes))
            print(f"  (writing {args.history} finished jobs: a minute or two)", flush=True)
            fill_history(store, args.history - min(SMALL, args.history), hosts=hosts)
            label = f"{args.jobs} waiting + {args.history} finished"
            rows.append(measure(label, collector, exporter, ping, args.scrapes))
        finally:
            exporter.stop()
    last, first = rows[-1], rows[0]
    print(
        f"at full size a scrape costs {last['http_ms']:.2f} ms over HTTP "
        f"({float(last['http_ms']) / ping:.0f} PING round trips); "
        f"empty: {first['http_ms']:.2f} ms"
    )
    return {"ping_ms": ping, "rows": rows}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print("SIMULATION: real Redis, drover code and exporter; a synthetic 200-host fleet")
    report = run(args)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
