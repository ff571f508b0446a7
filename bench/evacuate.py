"""How long it takes to empty a host: drover's evacuation against a plain virsh loop.

Why this bench exists: draining a host before maintenance is the everyday job behind live
migration, and the figure an operator feels is the makespan, from "go" until the host is empty.
The baseline is what an operator without drover would run: a sequential loop of
`virsh migrate --live --p2p --persistent --undefinesource` (the same flags drover's children
use), one guest after another, to the same destinations drover's plan chose. drover runs the
same guests with `--max-parallel 2` (and, as a second figure, `--max-parallel 1`, which shows
what drover's bookkeeping costs when nothing runs in parallel).

Each round moves every guest off lab1 once per method, alternating the order of the methods;
between runs the guests go back to lab1 (untimed). Every run is verified through libvirt on
all hosts: each guest running on its destination, nothing of it left on lab1.

It prints figures and never fails on them. It exits non-zero only when it could not measure.

    .venv/bin/python bench/evacuate.py [--guests 6] [--rounds 2] [--lab-id 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import libvirt

# Run as a script (`python bench/evacuate.py`), this directory is on sys.path.
from overhead import DEFAULT_LAB_ID, FOREIGN_ENV, NOISY_GUEST, BenchError, lookup, note

from config.settings import ConfigError, load_settings
from lab.proc import LabError
from producer.api import Drover

DEFAULT_GUESTS = 6
DEFAULT_ROUNDS = 2
HOSTS = 3
SOURCE = "lab1"
DESTINATIONS = ("lab2", "lab3")
PARALLEL = 2
TIMEOUT_S = 600.0
VIRSH_FLAGS = ("--live", "--p2p", "--persistent", "--undefinesource")


@dataclass
class Run:
    round: int
    method: str
    makespan_s: float
    guests: int


@dataclass(frozen=True)
class Lab:
    operator_uris: dict[str, str]
    peer_uris: dict[str, str]
    config: str


@contextmanager
def bench_lab(lab_id: int, guests: int) -> Iterator[Lab]:
    """Three hosts, `guests` idle guests on lab1 (dirty-1 removed); always taken down after."""
    os.environ["DROVER_LAB_ID"] = str(lab_id)
    for name in FOREIGN_ENV:
        os.environ.pop(name, None)
    from lab import control

    note(f"bringing up lab {lab_id}: {HOSTS} hosts, {guests} idle guests on {SOURCE} ...")
    started = time.monotonic()
    state = control.up(HOSTS, guests=guests)
    note(f"lab up in {time.monotonic() - started:.1f} s")
    try:
        status = control.status()
        settings = load_settings(state.config)
        lab = Lab(
            operator_uris={h: v["operator_uri"] for h, v in status["hosts"].items()},
            peer_uris={h: settings.host(h).peer_uri for h in status["hosts"]},
            config=state.config,
        )
        _remove_noisy_guest(lab)
        yield lab
    finally:
        note(f"taking lab {lab_id} down ...")
        control.down()


def _remove_noisy_guest(lab: Lab) -> None:
    """dirty-1 keeps a CPU busy and is not idle: the bench moves idle guests only."""
    conn = libvirt.open(lab.operator_uris[SOURCE])
    try:
        dom = lookup(conn, NOISY_GUEST)
        if dom is not None:
            dom.destroy()
            dom.undefine()
    finally:
        conn.close()


def where(lab: Lab) -> dict[str, list[str]]:
    """Every domain and the hosts libvirt shows it active on."""
    found: dict[str, list[str]] = {}
    for host, uri in lab.operator_uris.items():
        conn = libvirt.open(uri)
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                found.setdefault(dom.name(), []).append(host)
        finally:
            conn.close()
    return found


def defined_on_source(lab: Lab) -> list[str]:
    conn = libvirt.open(lab.operator_uris[SOURCE])
    try:
        return sorted(d.name() for d in conn.listAllDomains())
    finally:
        conn.close()


def verify_drained(lab: Lab, plan: dict[str, str], method: str) -> None:
    running = where(lab)
    for domain, destination in plan.items():
        if running.get(domain) != [destination]:
            raise BenchError(f"after {method}: {domain} runs on {running.get(domain)}")
    left = defined_on_source(lab)
    if left:
        raise BenchError(f"after {method}: still defined on {SOURCE}: {', '.join(left)}")


def everything_home(d: Drover) -> None:
    """All guests back on lab1 (drover evacuations, untimed) and every host enabled."""
    for host in (SOURCE, *DESTINATIONS):
        d.set_host_enabled(host, True)
    ids = [d.evacuate(host=h, to=[SOURCE]) for h in DESTINATIONS]
    for evacuation_id in ids:
        ev = d.wait_evacuation(evacuation_id, TIMEOUT_S)
        if ev.state.value != "drained":
            raise BenchError(f"could not bring the guests home: {ev.reason}")
    for host in (SOURCE, *DESTINATIONS):
        d.set_host_enabled(host, True)


def drover_run(d: Drover, max_parallel: int) -> tuple[float, dict[str, str]]:
    """Submit the evacuation; the makespan ends when its `drained` state is recorded."""
    started = time.monotonic()
    spec = d.evacuation_spec(host=SOURCE, to=list(DESTINATIONS), max_parallel=max_parallel)
    ev = d.wait_evacuation(d.evacuate(spec), TIMEOUT_S)
    makespan = time.monotonic() - started
    if ev.state.value != "drained":
        raise BenchError(f"drover evacuation ended {ev.state.value}: {ev.reason}")
    return makespan, {p.domain: p.destination or "" for p in ev.plan or []}


def virsh_loop(lab: Lab, plan: dict[str, str]) -> float:
    """The operator's baseline: one `virsh migrate` after another, to the same destinations."""
    started = time.monotonic()
    for domain, destination in sorted(plan.items()):
        argv = [
            "virsh",
            "-c",
            lab.operator_uris[SOURCE],
            "migrate",
            *VIRSH_FLAGS,
            domain,
            lab.peer_uris[destination],
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise BenchError(f"virsh migrate {domain}: {done.stderr.strip().splitlines()[-1]}")
    return time.monotonic() - started


def bench(args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    with bench_lab(args.lab_id, args.guests) as lab:
        d = Drover(load_settings(lab.config))
        # The plan is made once, by a dry run: every method moves the same guests to the same
        # destinations, so only the way of moving them differs.
        dry = d.wait_evacuation(
            d.evacuate(
                d.evacuation_spec(
                    host=SOURCE, to=list(DESTINATIONS), max_parallel=PARALLEL, dry_run=True
                )
            ),
            TIMEOUT_S,
        )
        plan = {p.domain: p.destination or "" for p in dry.plan or []}
        note(f"plan: {plan}")
        methods: list[tuple[str, Callable[[], float]]] = [
            (f"drover --max-parallel {PARALLEL}", lambda: _drover(d, lab, PARALLEL, plan)),
            ("virsh loop (sequential)", lambda: _virsh(lab, plan)),
            ("drover --max-parallel 1", lambda: _drover(d, lab, 1, plan)),
        ]
        for rnd in range(1, args.rounds + 1):
            order = methods if rnd % 2 else list(reversed(methods))
            for name, run in order:
                everything_home(d)
                makespan = run()
                note(f"round {rnd}: {name}: {makespan:.2f} s")
                runs.append(Run(rnd, name, makespan, len(plan)))
        everything_home(d)
    return runs


def _drover(d: Drover, lab: Lab, max_parallel: int, plan: dict[str, str]) -> float:
    makespan, got = drover_run(d, max_parallel)
    if got != plan:
        raise BenchError(f"drover placed {got}, the dry run planned {plan}")
    verify_drained(lab, plan, f"drover --max-parallel {max_parallel}")
    return makespan


def _virsh(lab: Lab, plan: dict[str, str]) -> float:
    makespan = virsh_loop(lab, plan)
    verify_drained(lab, plan, "the virsh loop")
    return makespan


def summarise(runs: list[Run]) -> dict[str, Any]:
    medians = {
        m: statistics.median(r.makespan_s for r in runs if r.method == m)
        for m in dict.fromkeys(r.method for r in runs)
    }
    baseline = medians["virsh loop (sequential)"]
    return {
        "guests": runs[0].guests if runs else 0,
        "rounds": max((r.round for r in runs), default=0),
        "median_makespan_s": {m: round(v, 2) for m, v in medians.items()},
        "ratio_to_virsh_loop": {m: round(baseline / v, 2) for m, v in medians.items()},
        "runs": [asdict(r) for r in runs],
    }


def print_report(summary: dict[str, Any]) -> None:
    print(
        f"evacuating {summary['guests']} idle guests {SOURCE} -> {', '.join(DESTINATIONS)}, "
        f"{summary['rounds']} rounds (median makespan)"
    )
    print(f"{'method':<28} {'makespan':>9} {'speed-up vs virsh loop':>24}")
    for method, median in summary["median_makespan_s"].items():
        ratio = summary["ratio_to_virsh_loop"][method]
        print(f"{method:<28} {median:>8.2f}s {ratio:>23.2f}x")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--guests", type=int, default=DEFAULT_GUESTS, help="idle guests on lab1")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    p.add_argument("--lab-id", type=int, default=DEFAULT_LAB_ID)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.guests < 1 or args.rounds < 1:
        p.error("--guests and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = bench(args)
    except (BenchError, LabError, ConfigError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    summary = summarise(runs)
    if args.json:
        print(json.dumps(summary))
    else:
        print_report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
