"""What drover adds to a live migration, in milliseconds, measured on the real lab.

Why this bench exists: drover wraps one libvirt call (`migrateToURI3`) in a job record in
Redis, five Celery phase tasks that hop between the source's and the destination's workers,
libvirt checks before and after, a progress monitor and an event stream. All of that is worth
having only if it costs little next to the migration itself; the targets (issue 17): at most
50 ms more than the same migration done directly with libvirt, at most 30 ms of the job's own
time outside its libvirt call, and at most 10 ms for the `submit()` call (medians). This
bench measures both under the same conditions, alternating them on the same guest between
the same two hosts, and prints the medians, the difference, each figure against its target
and where drover's time goes (per-phase medians from the job record).

It prints figures and never fails on them: a benchmark is not a test. It exits non-zero only
when it could not measure (lab not up, a migration failed or did not leave the guest where
expected).

    .venv/bin/python bench/overhead.py [--pairs 5] [--lab-id 5] [--use-running-lab] [--json]
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
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import libvirt

from config.settings import ConfigError
from jobs.follow import follow, is_end_event
from jobs.phases import PHASE_ORDER, Phase
from lab.proc import LabError

if TYPE_CHECKING:
    from jobs.model import Job
    from producer.api import Drover

DEFAULT_LAB_ID = 5
DOMAIN = "idle-1"
NOISY_GUEST = "dirty-1"
# Issue 17's targets, for medians; printed against the figures, never asserted.
TARGET_OVERHEAD_MS = 50.0  # drover job time - direct migrateToURI3
TARGET_INTERNAL_MS = 30.0  # drover job time - its own libvirt call (result.migration_ms)
TARGET_SUBMIT_MS = 10.0  # the submit() call
MS_PER_S = 1000.0
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "rolled_back"})
# How long one XREAD may block. It returns as soon as an event lands, so this only bounds how
# often the deadline is checked; it adds no latency to the measurement.
EVENT_BLOCK_MS = 1000
# Environment the bench owns: the lab it brings up must not inherit another lab's settings
# (its workers are spawned with our environment).
FOREIGN_ENV = ("DROVER_CONFIG", "DROVER_REDIS_URL")

Method = Literal["drover", "direct"]


class BenchError(Exception):
    """The bench cannot go on; the message says why in one line."""


def _quiet(_: Any, __: Any) -> None:
    """libvirt prints every error to stderr unless a handler is set; we raise them instead."""


libvirt.registerErrorHandler(_quiet, None)


def note(message: str) -> None:
    """Progress goes to stderr so that stdout is only the table (or only the JSON)."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LabHost:
    name: str
    operator_uri: str  # reachable from the root namespace: used to verify and for direct runs
    peer_uri: str  # what the destination hands off in drover: `dconnuri`
    address: str  # migration address: `tcp://ADDRESS` as VIR_MIGRATE_PARAM_URI


@dataclass
class Run:
    """One migration. Times in ms; drover-only fields are None for direct runs."""

    index: int
    pair: int
    warmup: bool
    method: Method
    src: str
    dst: str
    # drover: submit() called -> `job.state succeeded` event observed (read by XREAD);
    # direct: the migrateToURI3 call's wall time.
    total_ms: float
    migration_ms: float  # drover: its own `result.migration_ms`; direct: == total_ms
    submit_ms: float | None = None  # how long the submit() call itself took
    event_ms: float | None = None  # submit() called -> the succeeded event's own `ts`
    record_ms: float | None = None  # job.updated - job.created
    job_id: str | None = None
    segments: dict[str, float] = field(default_factory=dict)  # where the job's time went

    @property
    def internal_overhead_ms(self) -> float | None:
        return None if self.method == "direct" else self.total_ms - self.migration_ms


# --- lab -------------------------------------------------------------------------------------


def lab_hosts() -> tuple[dict[str, LabHost], str]:
    """The lab's hosts (as the registry and `drover lab status` describe them) and config."""
    from config.settings import load_settings
    from lab import control

    st = control.status()
    if not st["up"]:
        raise BenchError(f"no lab {st['lab_id']} is up (drop --use-running-lab to bring one up)")
    settings = load_settings(st["config"])
    hosts: dict[str, LabHost] = {}
    for name, h in st["hosts"].items():
        entry = settings.host(name)
        if not (h["worker_alive"] and h["libvirtd_alive"]):
            raise BenchError(f"{name}'s worker or libvirtd is not running; see `drover lab status`")
        hosts[name] = LabHost(
            name=name,
            operator_uri=h["operator_uri"],
            peer_uri=entry.peer_uri,
            address=entry.migration_address,
        )
    return hosts, str(st["config"])


@contextmanager
def lab(lab_id: int, use_running: bool) -> Iterator[None]:
    """Bring the lab up (unless told to use a running one) and always take down what we made."""
    os.environ["DROVER_LAB_ID"] = str(lab_id)
    from lab import control

    if use_running:
        yield
        return
    note(f"bringing up lab {lab_id} (namespaces drv{lab_id}-*) ...")
    started = time.monotonic()
    control.up(2)  # on failure it takes down what it had made itself, then raises
    note(f"lab {lab_id} up in {time.monotonic() - started:.1f} s")
    try:
        yield
    finally:
        note(f"taking lab {lab_id} down ...")
        removed = control.down()
        note("lab down: " + (", ".join(removed) if removed else "nothing was up"))


# --- libvirt ---------------------------------------------------------------------------------


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def where_running(conns: dict[str, libvirt.virConnect], name: str) -> str:
    """The one host on which `name` is active; BenchError if none or several."""
    found = [h for h, c in conns.items() if (d := lookup(c, name)) is not None and d.isActive()]
    if len(found) != 1:
        raise BenchError(f"{name} must run on exactly one host, found it active on {found or 0}")
    return found[0]


def verify_moved(conns: dict[str, libvirt.virConnect], src: str, dst: str, how: str) -> None:
    """Through libvirt on both hosts: the guest runs on `dst` and is not active on `src`."""
    arrived = lookup(conns[dst], DOMAIN)
    if arrived is None:
        raise BenchError(f"after {how} {src}->{dst}: {DOMAIN} is not defined on {dst}")
    state, _ = arrived.state()
    if not arrived.isActive() or state != libvirt.VIR_DOMAIN_RUNNING:
        raise BenchError(f"after {how} {src}->{dst}: {DOMAIN} on {dst} is in state {state}")
    left = lookup(conns[src], DOMAIN)
    if left is not None and left.isActive():
        raise BenchError(f"after {how} {src}->{dst}: {DOMAIN} is still active on {src}")


def pause_noisy_guest(conns: dict[str, libvirt.virConnect]) -> None:
    """dirty-1 keeps a CPU busy forever (TCG rewriting RAM); the bench does not need it."""
    for host, conn in conns.items():
        dom = lookup(conn, NOISY_GUEST)
        if dom is not None and dom.isActive():
            dom.suspend()
            note(f"paused {NOISY_GUEST} on {host} (it keeps a CPU busy; --keep-dirty to keep it)")


# --- the two ways of migrating ---------------------------------------------------------------


def migrate_direct(
    d: Drover, conns: dict[str, libvirt.virConnect], src: LabHost, dst: LabHost
) -> float:
    """The same libvirt call a drover worker makes, from the root namespace; its wall ms."""
    from jobs.policy_choice import effective_policy
    from jobs.record import Handoff
    from worker.migration_call import build_call

    # Built by drover's own function from a default spec and the hand-off the destination's
    # prepare phase would give, so flags and URIs are drover's by construction.
    spec = d.spec(domain=DOMAIN, src=src.name, dst=dst.name, live=True)
    handoff = Handoff(dconnuri=dst.peer_uri, migrate_uri=f"tcp://{dst.address}")
    call = build_call(spec, handoff, effective_policy(d.settings, spec).values)
    dom = lookup(conns[src.name], DOMAIN)
    if dom is None:
        raise BenchError(f"{DOMAIN} is not defined on {src.name}")
    started = time.perf_counter()
    try:
        dom.migrateToURI3(call.dconnuri, call.params, call.flags)
    except libvirt.libvirtError as exc:
        raise BenchError(
            f"direct migration {src.name}->{dst.name} failed: {exc.get_error_message()}"
        ) from None
    return (time.perf_counter() - started) * MS_PER_S


def _iso(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def migrate_drover(d: Drover, src: LabHost, dst: LabHost, timeout: float) -> Run:
    """One job through drover, timed from the submit() call to the terminal event.

    `Drover.wait` also wakes on the stream but then re-reads the whole job record; to keep that
    read out of the figure the job's event stream is followed here (jobs/follow.py, a blocking
    XREAD that returns the moment the worker appends the `job.state succeeded` event) and left
    at that event; the time it is read is the end of the job as a caller can see it (total_ms).
    The event's own `ts` (stamped by the worker just after the state change) gives a second
    end time that excludes delivery to us (event_ms), and updated - created from the record a
    third that excludes submit() (record_ms).
    """
    start_wall = time.time()
    started = time.perf_counter()
    job_id = d.submit(domain=DOMAIN, src=src.name, dst=dst.name, live=True)
    submit_ms = (time.perf_counter() - started) * MS_PER_S
    terminal: dict[str, Any] | None = None
    seen = started
    try:
        # The one follow of jobs/follow.py; stopping at the end event keeps the record read
        # (that the follow makes only once the stream is quiet) out of the figure.
        for _, event in follow(
            d.store,
            job_id,
            lambda: d.store.state(job_id).value in TERMINAL_STATES,
            state=lambda: d.store.state(job_id).value,
            block_ms=EVENT_BLOCK_MS,
            timeout=timeout,
        ):
            seen = time.perf_counter()
            if is_end_event(event):
                terminal = event
                break
    except TimeoutError as exc:
        raise BenchError(f"drover {exc}") from None
    if terminal is None:
        raise BenchError(f"drover job {job_id} ended without a job.state event")
    job = d.job(job_id)
    if terminal.get("state") != "succeeded" or job.state.value != "succeeded":
        raise BenchError(
            f"drover job {job_id} {src.name}->{dst.name} {job.state.value}: {job.reason}"
        )
    if job.result.migration_ms is None:
        raise BenchError(f"drover job {job_id} succeeded without result.migration_ms")
    return Run(
        index=0,
        pair=0,
        warmup=False,
        method="drover",
        src=src.name,
        dst=dst.name,
        total_ms=(seen - started) * MS_PER_S,
        migration_ms=job.result.migration_ms,
        submit_ms=submit_ms,
        event_ms=(_iso(terminal["ts"]).timestamp() - start_wall) * MS_PER_S,
        record_ms=(job.updated - job.created).total_seconds() * MS_PER_S,
        job_id=job_id,
        segments=segments(job, start_wall, seen - started),
    )


def segments(job: Job, start_wall: float, total_s: float) -> dict[str, float]:
    """Where one job's time went, in order; the pieces add up to total_ms.

    Phase records carry the worker's wall-clock start and end; the hosts are namespaces of this
    machine, so their clocks and ours are the same clock.
    """
    spans: list[tuple[str, datetime, datetime]] = []
    for phase in PHASE_ORDER:
        rec = job.phases.get(phase.value)
        if rec is None:
            return {}
        # confirm turns the job succeeded before its own phase record gets its end time, so
        # right after the succeeded event that end may still be missing; it is not needed.
        ended = rec.ended or (job.updated if phase is Phase.CONFIRM else None)
        if ended is None:
            return {}
        spans.append((phase.value, rec.started, ended))

    def ms(a: datetime, b: datetime) -> float:
        return (b - a).total_seconds() * MS_PER_S

    out = {"submit -> job record": (job.created.timestamp() - start_wall) * MS_PER_S}
    previous = job.created
    for name, started, ended in spans:
        out[f"{'record' if name == spans[0][0] else 'hop'} -> {name}"] = ms(previous, started)
        if name == Phase.PERFORM.value:
            migration = job.result.migration_ms or 0.0
            out["perform: migrateToURI3"] = migration
            out["perform: the rest"] = ms(started, ended) - migration
        elif name == Phase.CONFIRM.value:
            out["confirm -> succeeded"] = ms(started, job.updated)
        else:
            out[name] = ms(started, ended)
        previous = ended
    out["succeeded -> observed"] = total_s * MS_PER_S - sum(out.values())
    return out


# --- the bench -------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> list[Run]:
    from config.settings import load_settings
    from producer.api import Drover

    hosts, config = lab_hosts()
    d = Drover(load_settings(config))
    conns = {name: libvirt.open(h.operator_uri) for name, h in hosts.items()}
    try:
        if not args.use_running_lab and not args.keep_dirty:
            pause_noisy_guest(conns)
        at = where_running(conns, DOMAIN)
        names = sorted(hosts)
        if len(names) < 2:
            raise BenchError("the lab needs two hosts")
        a, b = names[0], names[1]
        if at not in (a, b):
            raise BenchError(f"{DOMAIN} runs on {at}, the bench uses {a} and {b}")
        runs: list[Run] = []
        total_pairs = args.warmup + args.pairs
        for pair in range(total_pairs):
            # Alternate which method goes first so that each one moves the guest both ways.
            order: tuple[Method, Method] = (
                ("drover", "direct") if pair % 2 == 0 else ("direct", "drover")
            )
            for method in order:
                src, dst = hosts[at], hosts[b if at == a else a]
                if method == "drover":
                    run = migrate_drover(d, src, dst, args.timeout)
                else:
                    ms = migrate_direct(d, conns, src, dst)
                    run = Run(0, 0, False, "direct", src.name, dst.name, ms, ms)
                verify_moved(conns, src.name, dst.name, method)
                run.index, run.pair, run.warmup = len(runs) + 1, pair + 1, pair < args.warmup
                runs.append(run)
                at = dst.name
                note(
                    f"  {run.index:2d} {'warm-up' if run.warmup else 'measured'} {method:6s} "
                    f"{src.name}->{dst.name} {run.total_ms:8.1f} ms (verified on both hosts)"
                )
        return runs
    finally:
        for conn in conns.values():
            conn.close()


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _range(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def summarise(runs: list[Run], lab_id: int, warmup: int) -> dict[str, Any]:
    measured = [r for r in runs if not r.warmup]
    drover = [r for r in measured if r.method == "drover"]
    direct = [r for r in measured if r.method == "direct"]
    job_ms = _median([r.total_ms for r in drover])
    direct_ms = _median([r.total_ms for r in direct])
    overhead = None if job_ms is None or direct_ms is None else job_ms - direct_ms
    segment_names = next((list(r.segments) for r in drover if r.segments), [])
    internal = _median([r.total_ms - r.migration_ms for r in drover])
    submit = _median([r.submit_ms for r in drover if r.submit_ms is not None])
    return {
        "lab_id": lab_id,
        "domain": DOMAIN,
        "pairs": len(drover),
        "warmup_pairs": warmup,
        "median_drover_job_ms": job_ms,
        "median_direct_ms": direct_ms,
        "overhead_ms": overhead,
        "ratio": job_ms / direct_ms if job_ms is not None and direct_ms else None,
        "median_internal_overhead_ms": internal,
        "median_drover_migration_ms": _median([r.migration_ms for r in drover]),
        "range_drover_job_ms": _range([r.total_ms for r in drover]),
        "range_direct_ms": _range([r.total_ms for r in direct]),
        "range_drover_migration_ms": _range([r.migration_ms for r in drover]),
        "median_drover_event_ms": _median([r.event_ms for r in drover if r.event_ms is not None]),
        "median_drover_record_ms": _median(
            [r.record_ms for r in drover if r.record_ms is not None]
        ),
        "median_submit_ms": submit,
        "segment_medians_ms": {
            name: _median([r.segments[name] for r in drover if name in r.segments])
            for name in segment_names
        },
        "targets": targets(overhead, internal, submit),
        "target_met": overhead is not None and overhead <= TARGET_OVERHEAD_MS,
        "runs": [asdict(r) | {"internal_overhead_ms": r.internal_overhead_ms} for r in runs],
    }


def targets(
    overhead: float | None, internal: float | None, submit: float | None
) -> dict[str, dict[str, Any]]:
    """Each figure issue 17 sets a target for: its median, the target, and whether it is met."""
    figures = (
        ("overhead_ms", overhead, TARGET_OVERHEAD_MS),
        ("internal_overhead_ms", internal, TARGET_INTERNAL_MS),
        ("submit_ms", submit, TARGET_SUBMIT_MS),
    )
    return {
        name: {"median": value, "target": target, "met": value is not None and value <= target}
        for name, value, target in figures
    }


def _rounded(value: Any) -> Any:
    """Times to 0.1 ms in the JSON (the clocks are not better than that); the ratio as is."""
    if isinstance(value, float):
        return round(value, 1)
    if isinstance(value, dict):
        return {k: v if k == "ratio" else _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _f(value: float | None, width: int = 8) -> str:
    return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}}"


def print_report(runs: list[Run], summary: dict[str, Any]) -> None:
    print(
        f"{'#':>2} {'pair':>4} {'':8} {'method':6} {'route':11} {'total ms':>8} "
        f"{'event ms':>8} {'record ms':>9} {'migr. ms':>8} {'int. ovh':>8}  job"
    )
    for r in runs:
        print(
            f"{r.index:2d} {r.pair:4d} {'warm-up' if r.warmup else '':8} {r.method:6} "
            f"{r.src + '->' + r.dst:11} {_f(r.total_ms)} {_f(r.event_ms)} "
            f"{_f(r.record_ms, 9)} {_f(r.migration_ms)} {_f(r.internal_overhead_ms)}  "
            f"{r.job_id or ''}"
        )
    print(
        "total ms: drover = submit() called -> succeeded event read; direct = migrateToURI3 call."
        "\nevent ms: to the event's own ts; record ms: job.updated - job.created;"
        " int. ovh: total - migr."
    )
    print()
    seg = summary["segment_medians_ms"]
    if seg:
        print("drover job, median per segment (ms):")
        for name, value in seg.items():
            print(f"  {name:30} {_f(value)}")
        print()
    s = summary
    print(f"measured pairs:                       {s['pairs']} (+{s['warmup_pairs']} warm-up)")
    print(f"median drover job time:               {_f(s['median_drover_job_ms'])} ms")
    print(f"median direct libvirt migration:      {_f(s['median_direct_ms'])} ms")
    print(f"overhead (drover - direct):           {_f(s['overhead_ms'])} ms")
    ratio = s["ratio"]
    print(f"ratio drover/direct:                  {ratio:8.3f}" if ratio else "ratio: -")
    print(f"internal overhead (job - migr. ms):   {_f(s['median_internal_overhead_ms'])} ms")
    print(f"median drover migration_ms:           {_f(s['median_drover_migration_ms'])} ms")
    for label, key in (
        ("drover job", "range_drover_job_ms"),
        ("direct libvirt", "range_direct_ms"),
        ("drover migration_ms", "range_drover_migration_ms"),
    ):
        low, high = s[key] or (None, None)
        print(f"{'range ' + label + ':':38}{_f(low)} .. {_f(high).strip()} ms")
    print(f"median drover submit() call:          {_f(s['median_submit_ms'])} ms")
    print()
    print("targets (issue 17, medians):")
    labels = {
        "overhead_ms": "overhead (drover - direct)",
        "internal_overhead_ms": "internal overhead",
        "submit_ms": "submit() call",
    }
    for name, t in s["targets"].items():
        met = "met" if t["met"] else "NOT met"
        print(f"  {labels[name]:34} {_f(t['median'])} ms <= {t['target']:5.0f} ms: {met}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--pairs", type=int, default=5, help="measured pairs (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured pairs first (default 1)")
    p.add_argument("--lab-id", type=int, default=DEFAULT_LAB_ID, help="default 5")
    p.add_argument("--use-running-lab", action="store_true", help="neither bring up nor down")
    p.add_argument("--keep-dirty", action="store_true", help=f"leave {NOISY_GUEST} running")
    p.add_argument("--timeout", type=float, default=120.0, help="per migration, seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object, no table")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.warmup < 0:
        p.error("--pairs must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in FOREIGN_ENV:
        os.environ.pop(name, None)
    try:
        with lab(args.lab_id, args.use_running_lab):
            runs = bench(args)
    except (BenchError, ConfigError, LabError) as exc:
        note(f"bench aborted: {exc}")
        return 1
    summary = summarise(runs, args.lab_id, args.warmup)
    if args.json:
        print(json.dumps(_rounded(summary), indent=2))
    else:
        print_report(runs, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
