"""How long a drover job takes in each migration mode, in milliseconds, on the real lab.

drover supports every control flow and transport of libvirt's migration guide (see
docs/modes.md); they differ in who talks to whom and in how the memory travels, so they do not
cost the same. This bench moves `idle-1` between the two hosts of a lab of its own (brought up
with TLS, so the TLS modes work) in each mode, `--runs` there-and-back pairs per mode, and
prints per mode the median end-to-end job time (submit() called -> the terminal `job.state`
event read from the job's event stream, as in bench/overhead.py), the median of the job's own
`result.migration_ms`, the range of job times, and the libvirt API and flags the worker used
(from the job's `migration.started` event). Every migration is checked through libvirt on both
hosts.

Two modes do not go there and back: an offline migration copies only the definition (the guest
keeps running on the source; the copy is undefined on the destination again after each run,
and only that direction is counted), and unmanaged direct is expected to fail (QEMU has none:
the source's pre-check refuses it, as libvirt would); for that one the time to the failed
terminal state and the reason are reported, and the guest is checked to still run on the
source.

It prints figures and never fails on them: a benchmark is not a test. It exits non-zero only
when it could not measure (the lab did not come up, a mode did not end as expected, or a
migration did not leave the guest where expected).

    .venv/bin/python bench/modes.py [--runs 3] [--warmup 1] [--lab-id 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import libvirt

# Run as a script (`python bench/modes.py`), this directory is on sys.path; the repository
# root is not, and `bench` is not an installed package.
from overhead import (
    DEFAULT_LAB_ID,
    DOMAIN,
    FOREIGN_ENV,
    MS_PER_S,
    NOISY_GUEST,
    BenchError,
    LabHost,
    _rounded,
    lab_hosts,
    lookup,
    migrate_drover,
    note,
    pause_noisy_guest,
    verify_moved,
    where_running,
)

from config.settings import ConfigError
from lab.proc import LabError
from producer.api import Drover

if TYPE_CHECKING:
    from config.settings import Settings
    from jobs.model import Job
    from jobs.spec import MigrationSpec

# pair: there and back, both counted; offline: there only, the copy undefined afterwards;
# refused: expected to fail with the guest left running on the source.
Kind = Literal["pair", "offline", "refused"]
Conns = dict[str, libvirt.virConnect]


@dataclass(frozen=True)
class Mode:
    name: str
    options: dict[str, Any]  # MigrationSpec options on top of drover's defaults
    kind: Kind = "pair"
    moves_config: bool = False  # --persistent --undefine-source: the definition moves too

    @property
    def expected_state(self) -> str:
        return "failed" if self.kind == "refused" else "succeeded"


MODES: tuple[Mode, ...] = (
    Mode("native p2p", {}),
    Mode("tunnelled p2p", {"transport": "tunnelled"}),
    Mode("managed direct", {"control": "direct"}),
    Mode("p2p via virDomainMigrate2", {"dest_connection": True}),
    Mode("tunnelled via virDomainMigrate2", {"dest_connection": True, "transport": "tunnelled"}),
    Mode("native p2p + TLS", {"tls": True}),
    Mode("managed direct + TLS", {"control": "direct", "tls": True}),
    Mode(
        "p2p persistent+undefine-source",
        {"persistent": True, "undefine_source": True},
        moves_config=True,
    ),
    Mode(
        "offline (definition only)", {"live": False, "offline": True, "persistent": True}, "offline"
    ),
    Mode("unmanaged direct", {"control": "unmanaged"}, "refused"),
)
WARMUP_MODE = MODES[0]


class TimedDrover(Drover):
    """drover's producer API with the current mode's options added to every submit().

    `migrate_drover` (bench/overhead.py) submits a default live job and times it to its
    terminal event; this lets it submit any mode. It raises on a job that did not succeed, so
    for an expected failure the time is taken from here instead: from entering submit() to
    the moment it reads the job record, right after the terminal event arrived.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.options: dict[str, Any] = {}
        self.submitted_at = 0.0
        self.read_at = 0.0
        self.last_job: Job | None = None

    def submit(self, spec: MigrationSpec | None = None, **request: Any) -> str:
        self.submitted_at = time.perf_counter()
        self.last_job = None
        return super().submit(spec, **(request | self.options))

    def job(self, job_id: str) -> Job:
        self.read_at = time.perf_counter()
        self.last_job = super().job(job_id)
        return self.last_job


@dataclass
class ModeRun:
    """One drover job in one mode. Times in ms."""

    mode: str
    src: str
    dst: str
    state: str  # the job's terminal state
    job_ms: float  # submit() called -> terminal job.state event read
    migration_ms: float | None  # the job's result.migration_ms (none when perform failed)
    job_id: str
    call: str  # libvirt API and flags, from the migration.started event
    reason: str | None = None


@dataclass
class ModeResult:
    mode: Mode
    runs: list[ModeRun] = field(default_factory=list)
    error: str | None = None  # the mode did not end as expected; its remaining runs skipped


# --- lab -------------------------------------------------------------------------------------


@contextmanager
def tls_lab(lab_id: int) -> Iterator[None]:
    """Bring up a two-host lab with TLS and always take it down again."""
    os.environ["DROVER_LAB_ID"] = str(lab_id)
    from lab import control

    note(f"bringing up lab {lab_id} with TLS (namespaces drv{lab_id}-*) ...")
    started = time.monotonic()
    control.up(2, tls=True)  # on failure it takes down what it had made itself, then raises
    note(f"lab {lab_id} up in {time.monotonic() - started:.1f} s")
    try:
        yield
    finally:
        note(f"taking lab {lab_id} down ...")
        removed = control.down()
        note("lab down: " + (", ".join(removed) if removed else "nothing was up"))


# --- one job ---------------------------------------------------------------------------------


def describe_call(d: Drover, job_id: str) -> str:
    """`api FLAG|FLAG` of the job's libvirt call, as its migration.started event records it."""
    calls = [e["call"] for e in d.events(job_id) if e.get("event") == "migration.started"]
    if not calls:
        return "-"
    flags = "|".join(f.removeprefix("VIR_MIGRATE_") for f in calls[0]["flags"]) or "0"
    return f"{calls[0]['api']} {flags}"


def run_job(d: TimedDrover, mode: Mode, src: LabHost, dst: LabHost, timeout: float) -> ModeRun:
    """One job in `mode`, timed by overhead.migrate_drover; a failed job is returned, too."""
    d.options = mode.options
    try:
        run = migrate_drover(d, src, dst, timeout)
    except BenchError:
        job = d.last_job
        if job is None or not job.terminal:  # timed out or never read: nothing to report
            raise
        result = ModeRun(
            mode=mode.name,
            src=src.name,
            dst=dst.name,
            state=job.state.value,
            job_ms=(d.read_at - d.submitted_at) * MS_PER_S,
            migration_ms=job.result.migration_ms,
            job_id=job.id,
            call=describe_call(d, job.id),
            reason=job.reason,
        )
    else:
        assert run.job_id is not None
        result = ModeRun(
            mode=mode.name,
            src=src.name,
            dst=dst.name,
            state="succeeded",
            job_ms=run.total_ms,
            migration_ms=run.migration_ms,
            job_id=run.job_id,
            call=describe_call(d, run.job_id),
        )
    return result


# --- checks through libvirt ------------------------------------------------------------------


def verify_config_moved(conns: Conns, src: str, dst: str) -> None:
    """--persistent --undefine-source: defined (persistent) on `dst`, not at all on `src`."""
    arrived = lookup(conns[dst], DOMAIN)
    if arrived is None or not arrived.isPersistent():
        raise BenchError(f"after --persistent {src}->{dst}: {DOMAIN} is transient on {dst}")
    if lookup(conns[src], DOMAIN) is not None:
        raise BenchError(f"after --undefine-source {src}->{dst}: {DOMAIN} still defined on {src}")


def verify_offline_copy(conns: Conns, src: str, dst: str) -> None:
    """Offline: an inactive persistent copy on `dst`; the guest still running on `src`."""
    copy = lookup(conns[dst], DOMAIN)
    if copy is None or copy.isActive() or not copy.isPersistent():
        found = "none" if copy is None else f"active={copy.isActive()}"
        raise BenchError(f"after offline {src}->{dst}: no inactive definition on {dst} ({found})")
    verify_still_running(conns, src, dst, "offline")


def verify_still_running(conns: Conns, src: str, dst: str, how: str) -> None:
    """The guest runs on `src`, as before, and is not active on `dst`."""
    dom = lookup(conns[src], DOMAIN)
    if dom is None or dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
        raise BenchError(f"after {how} {src}->{dst}: {DOMAIN} no longer runs on {src}")
    other = lookup(conns[dst], DOMAIN)
    if other is not None and other.isActive():
        raise BenchError(f"after {how} {src}->{dst}: {DOMAIN} is active on {dst}")


def undefine_copy(conns: Conns, host: str) -> None:
    dom = lookup(conns[host], DOMAIN)
    if dom is None or dom.isActive():
        raise BenchError(f"no inactive copy of {DOMAIN} on {host} to undefine")
    dom.undefine()


# --- the bench -------------------------------------------------------------------------------


def measure_mode(
    d: TimedDrover,
    conns: Conns,
    hosts: dict[str, LabHost],
    mode: Mode,
    at: str,
    runs: int,
    timeout: float,
    warmup: bool = False,
) -> tuple[ModeResult, str]:
    """Run one mode `runs` times from `at`; the result and where the guest runs afterwards."""
    result = ModeResult(mode)
    other = next(h for h in hosts if h != at)
    legs = [(at, other), (other, at)] if mode.kind == "pair" else [(at, other)]
    for _ in range(runs):
        for src, dst in legs:
            run = run_job(d, mode, hosts[src], hosts[dst], timeout)
            result.runs.append(run)
            expected = mode.expected_state
            note(
                f"  {mode.name:32} {src}->{dst} {run.state:9} job {run.job_ms:7.1f} ms, "
                f"migration {_f(run.migration_ms, 7).strip()} ms"
                f"{'  (warm-up)' if warmup else ''}"
            )
            if run.state != expected:
                result.error = f"job {run.job_id} {src}->{dst} {run.state}, expected {expected}" + (
                    f": {run.reason}" if run.reason else ""
                )
                note(f"  {mode.name}: {result.error}; skipping its remaining runs")
                return result, where_running(conns, DOMAIN)
            if mode.kind == "pair":
                verify_moved(conns, src, dst, mode.name)
                if mode.moves_config:
                    verify_config_moved(conns, src, dst)
            elif mode.kind == "offline":
                verify_offline_copy(conns, src, dst)
                undefine_copy(conns, dst)
            else:
                verify_still_running(conns, src, dst, mode.name)
                if lookup(conns[dst], DOMAIN) is not None:
                    raise BenchError(f"after {mode.name} {src}->{dst}: {DOMAIN} defined on {dst}")
    return result, at


def bench(args: argparse.Namespace) -> list[ModeResult]:
    from config.settings import load_settings

    hosts, config = lab_hosts()
    if len(hosts) != 2:
        raise BenchError(f"the bench needs a lab of two hosts, found {sorted(hosts)}")
    d = TimedDrover(load_settings(config))
    conns = {name: libvirt.open(h.operator_uri) for name, h in hosts.items()}
    try:
        if not args.keep_dirty:
            pause_noisy_guest(conns)
        at = where_running(conns, DOMAIN)
        results: list[ModeResult] = []
        if args.warmup:
            note(f"warm-up: {args.warmup} {WARMUP_MODE.name} pair(s), not counted")
            warm, at = measure_mode(
                d, conns, hosts, WARMUP_MODE, at, args.warmup, args.timeout, warmup=True
            )
            if warm.error:
                raise BenchError(f"warm-up failed: {warm.error}")
        for mode in MODES:
            result, at = measure_mode(d, conns, hosts, mode, at, args.runs, args.timeout)
            results.append(result)
        return results
    finally:
        for conn in conns.values():
            conn.close()


def summarise(result: ModeResult) -> dict[str, Any]:
    counted = [r for r in result.runs if r.state == result.mode.expected_state]
    job_ms = [r.job_ms for r in counted]
    migration_ms = [r.migration_ms for r in counted if r.migration_ms is not None]
    return {
        "mode": result.mode.name,
        "options": result.mode.options,
        "kind": result.mode.kind,
        "runs": len(counted),
        "median_job_ms": statistics.median(job_ms) if job_ms else None,
        "median_migration_ms": statistics.median(migration_ms) if migration_ms else None,
        "range_job_ms": [min(job_ms), max(job_ms)] if job_ms else None,
        "calls": sorted({r.call for r in result.runs}),
        "reasons": sorted({r.reason for r in counted if r.reason}),
        "error": result.error,
    }


def _f(value: float | None, width: int = 8) -> str:
    return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}}"


def print_table(summaries: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"{'mode':32} {'runs':>4} {'job ms':>8} {'migr. ms':>8} {'job ms min..max':>17}  "
        "libvirt call (API, flags)"
    )
    for s in summaries:
        low, high = s["range_job_ms"] or (None, None)
        span = f"{_f(low).strip()}..{_f(high).strip()}" if low is not None else "-"
        print(
            f"{s['mode']:32} {s['runs']:4d} {_f(s['median_job_ms'])} "
            f"{_f(s['median_migration_ms'])} {span:>17}  {'; '.join(s['calls'])}"
        )
    print(
        "job ms: median, submit() called -> terminal job.state event read; migr. ms: median of"
        " the job's result.migration_ms."
        f"\nruns: {args.runs} there-and-back pairs per mode (both directions counted), "
        f"after {args.warmup} warm-up {WARMUP_MODE.name} pair(s); offline and unmanaged go"
        " there only."
    )
    for s in summaries:
        if s["kind"] == "refused" and s["runs"]:
            print(f"{s['mode']}: failed as expected (job ms = to the failed state):")
            for reason in s["reasons"]:
                print(f"  {reason}")
    for s in summaries:
        if s["error"]:
            print(f"{s['mode']}: NOT as expected: {s['error']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=3, help="there-and-back pairs per mode (3)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted native p2p pairs first (1)")
    p.add_argument("--lab-id", type=int, default=DEFAULT_LAB_ID, help="default 5")
    p.add_argument("--keep-dirty", action="store_true", help=f"leave {NOISY_GUEST} running")
    p.add_argument("--timeout", type=float, default=120.0, help="per migration, seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object, no table")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in FOREIGN_ENV:
        os.environ.pop(name, None)
    try:
        with tls_lab(args.lab_id):
            results = bench(args)
    except (BenchError, ConfigError, LabError) as exc:
        note(f"bench aborted: {exc}")
        return 1
    summaries = [summarise(r) for r in results]
    if args.json:
        runs = [asdict(r) for result in results for r in result.runs]
        out = {"lab_id": args.lab_id, "domain": DOMAIN, "runs_per_mode": args.runs}
        out |= {"warmup_pairs": args.warmup, "modes": summaries, "runs": runs}
        print(json.dumps(_rounded(out), indent=2))
    else:
        print_table(summaries, args)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
