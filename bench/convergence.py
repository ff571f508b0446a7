"""Busy guests under bandwidth caps: virsh's recipes against drover's policies, on the lab.

Moves `dirty-1` from lab1 to lab2 and tells whether it lands, how fast, with how long a pause.

Why this bench exists: a guest that dirties memory faster than the link copies it never
converges in plain pre-copy, and the fleets that must move it (a host drain) fail on it. Issue 13
asks drover's `default` policy to land every such guest on its own, at least as fast as
virsh's own `--postcopy --postcopy-after-precopy` and with at most 300 ms of downtime, and the
`no-postcopy` policy to land it too without exceeding its allowed downtime except through a
suspend step its events name. This bench measures exactly that, in one run:

    variants    virsh plain pre-copy (`virsh migrate --live --p2p --bandwidth CAP`),
                virsh `--auto-converge`, virsh `--postcopy --postcopy-after-precopy`,
                drover with only the cap (`bandwidth_mib=CAP`: the `default` policy),
                drover with `policy="no-postcopy"` (config/policy_model.py)
    caps        8, 32, 64 MiB/s (`--caps`); `--runs` runs per row (default 3)
    cut         every run is cut at `--cut` s (60): virsh with `virsh domjobabort`, drover
                with its own abort; a migration already in post-copy cannot be aborted and is
                followed to its end (it counts as not completed within the cut)

virsh runs from the root namespace against the source's own libvirtd (the lab's operator
URI), with the same destination URI (the registry's peer URI) and migration URI
(`tcp://<destination's migration address>`) drover's worker hands to libvirt, so only the
tool differs. Its wall time is the command's; drover's runs from `submit()` to the moment the
job's terminal event is read from its event stream (bench/overhead.py's measure).

The downtime comes from libvirt for every variant, measured the same way: the bench holds its
own connection to the source's libvirtd with an event loop and reads `downtime` from the
job-completed event's statistics (bench/job_completed.py); after post-copy the destination's
`domjobinfo --completed` shows none.

Before every run dirty-1 is put back on lab1 (a non-live move, untimed) and checked there
through libvirt on both hosts: active on lab1 only, running (not paused), its pass counter
moving. After every run libvirt decides where the guest is, whatever the tool said.

It prints figures and never fails on them; it exits non-zero only when it could not measure
(the lab did not come up, the guest could not be put back or was left in a state the bench
cannot trust).

    .venv/bin/python bench/convergence.py [--runs 3] [--caps 8,32,64] [--cut 60]
        [--variants virsh-plain,...] [--lab-id 5] [--use-running-lab] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import libvirt
import libvirt_qemu
from job_completed import JobCompletedListener, start_event_loop

# Run as a script (`python bench/convergence.py`), this directory is on sys.path.
from overhead import (
    DEFAULT_LAB_ID,
    FOREIGN_ENV,
    NOISY_GUEST,
    BenchError,
    LabHost,
    lab,
    lab_hosts,
    lookup,
)
from rich.console import Console, JustifyMethod
from rich.table import Table

from config.policy_model import BUILTIN_POLICIES, DEFAULT_POLICY, PolicyAction
from config.settings import ConfigError, load_settings
from jobs.errors import SubmitError
from jobs.follow import follow, is_end_event
from jobs.streams import Event
from lab.kernel import parse_pass_counter, read_pass_counter_hmp_command
from lab.proc import LabError
from producer.api import Drover

DOMAIN = NOISY_GUEST  # dirty-1: rewrites 64 MiB of its 128 MiB all the time
SRC, DST = "lab1", "lab2"
DEFAULT_CAPS = (8, 32, 64)
DEFAULT_RUNS = 3
DEFAULT_CUT_S = 60.0
# Issue 13's target for the default policy (also the default policy's max_downtime_ms).
TARGET_DOWNTIME_MS = 300.0
# After the cut: how long an abort, or a post-copy that cannot be aborted, may take to end.
AFTER_CUT_S = 120.0
# virsh after `domjobabort`: it returns within a second here; then it is killed.
ABORT_GRACE_S = 30.0
VIRSH_CALL_S = 30.0  # a short virsh command (domjobabort)
# libvirt showing the guest in one place, with no job, after a run or a move home.
SETTLE_S = 60.0
# The job-completed event once the tool has returned (it is sent before the call returns;
# this only bounds its delivery to us).
EVENT_WAIT_S = 10.0
# dirty-1 makes about 25 passes a second: its counter moves well within this.
COUNTER_WAIT_S = 10.0
POLL_S = 0.1
EVENT_BLOCK_MS = 500
# The table's width when stdout is not a terminal (Rich would wrap it at 80).
REPORT_WIDTH = 180

Tool = Literal["virsh", "drover"]


@dataclass(frozen=True)
class Variant:
    key: str  # what --variants takes
    label: str
    tool: Tool
    virsh_flags: tuple[str, ...] = ()
    policy: str | None = None  # drover: MigrationSpec.policy (None: the default policy)


VARIANTS = (
    Variant("virsh-plain", "virsh plain pre-copy", "virsh"),
    Variant("virsh-autoconverge", "virsh --auto-converge", "virsh", ("--auto-converge",)),
    Variant(
        "virsh-postcopy",
        "virsh --postcopy --postcopy-after-precopy",
        "virsh",
        ("--postcopy", "--postcopy-after-precopy"),
    ),
    Variant("drover-default", "drover, only the cap (default policy)", "drover"),
    Variant("drover-no-postcopy", "drover, policy no-postcopy", "drover", policy="no-postcopy"),
)
BY_KEY = {v.key: v for v in VARIANTS}
BASELINE = "virsh-postcopy"  # what drover's median is compared with, at the same cap
DROVER_DEFAULT = "drover-default"
NO_POSTCOPY = "drover-no-postcopy"


@dataclass
class Run:
    """One move of dirty-1, as measured and as libvirt left it."""

    variant: str
    cap_mib: int
    rep: int  # 1..runs
    completed: bool  # on lab2, running, within the cut
    landed: bool  # on lab2 at the end (maybe after the cut: post-copy cannot be aborted)
    wall_s: float  # to the end of the run, whatever that end was
    outcome: str  # one line
    downtime_ms: float | None = None  # from libvirt's job-completed event
    job_id: str | None = None
    job_state: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)  # drover's policy.step events
    policy: str | None = None  # the effective policy's name (drover)
    policy_max_downtime_ms: int | None = None
    suspended: bool = False  # a policy.step suspend was carried out

    @property
    def actions(self) -> list[str]:
        return [str(s.get("action")) for s in self.steps if s.get("done") is not False]


@dataclass
class Bench:
    """What every run needs: the lab's hosts, connections, drover and the downtime listener."""

    hosts: dict[str, LabHost]
    conns: dict[str, libvirt.virConnect]
    drover: Drover
    events: JobCompletedListener
    cut_s: float
    say: Callable[[str], None]
    virsh: subprocess.Popen[str] | None = None  # the running virsh, killed if we stop
    job_id: str | None = None  # the running drover job, aborted if we stop

    @property
    def dconnuri(self) -> str:
        return str(self.hosts[DST].peer_uri)

    @property
    def migrate_uri(self) -> str:
        return f"tcp://{self.hosts[DST].address}"


# --- where libvirt shows the guest ------------------------------------------------------------


def _describe(conns: dict[str, libvirt.virConnect]) -> str:
    parts = []
    for host, conn in sorted(conns.items()):
        dom = lookup(conn, DOMAIN)
        if dom is None:
            parts.append(f"{host}: not defined")
            continue
        state, reason = dom.state()
        parts.append(f"{host}: {'active' if dom.isActive() else 'inactive'} {state}/{reason}")
    return "; ".join(parts)


def _settled(conns: dict[str, libvirt.virConnect]) -> tuple[str, int, int] | None:
    """(host, state, reason) when exactly one host runs a copy of the guest, with no job on
    it and not paused by a migration; None while libvirt is still moving or cleaning up."""
    active = []
    for host, conn in conns.items():
        dom = lookup(conn, DOMAIN)
        if dom is not None and dom.isActive():
            active.append((host, dom))
    if len(active) != 1:
        return None
    host, dom = active[0]
    state, reason = dom.state()
    moving = (libvirt.VIR_DOMAIN_PAUSED_MIGRATION, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY)
    if state == libvirt.VIR_DOMAIN_PAUSED and reason in moving:
        return None
    if dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    return host, state, reason


def settle(b: Bench, timeout: float = SETTLE_S) -> tuple[str, int, int]:
    """Wait until libvirt shows the guest in one place (see `_settled`); BenchError if not."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = _settled(b.conns)
        except libvirt.libvirtError:
            found = None  # a domain that went away between the lookup and the question
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise BenchError(
                f"{DOMAIN} did not settle on one host within {timeout:g}s: {_describe(b.conns)}"
            )
        time.sleep(POLL_S)


def settled_running(b: Bench, what: str) -> str:
    """The host the guest ended on after `what`; BenchError unless it is running there."""
    host, state, reason = settle(b)
    if state != libvirt.VIR_DOMAIN_RUNNING:
        raise BenchError(f"after {what}: {DOMAIN} is {state}/{reason} on {host}, not running")
    return host


def _pass_counter(dom: libvirt.virDomain) -> int:
    out = libvirt_qemu.qemuMonitorCommand(
        dom, read_pass_counter_hmp_command(), libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )
    return parse_pass_counter(out)


def home(b: Bench) -> None:
    """dirty-1 back on lab1, running, and checked there: libvirt on both hosts (active on
    lab1 only, running, no job) and its pass counter moving (the guest really runs).

    A guest on lab2 comes back by a non-live peer-to-peer move (libvirt pauses it, copies it
    at full speed and resumes it on arrival): untimed, and never in post-copy.
    """
    host, state, reason = settle(b)
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_USER:
        dom = lookup(b.conns[host], DOMAIN)
        assert dom is not None
        dom.resume()  # paused by whoever brought the lab up (tests pause it)
    if host == DST:
        dom = lookup(b.conns[DST], DOMAIN)
        assert dom is not None
        params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{b.hosts[SRC].address}"}
        try:
            dom.migrateToURI3(b.hosts[SRC].peer_uri, params, libvirt.VIR_MIGRATE_PEER2PEER)
        except libvirt.libvirtError as exc:
            raise BenchError(f"could not bring {DOMAIN} home: {exc.get_error_message()}") from None
    where = settled_running(b, "bringing it home")
    if where != SRC:
        raise BenchError(f"{DOMAIN} should be home on {SRC}, libvirt shows it on {where}")
    dom = lookup(b.conns[SRC], DOMAIN)
    assert dom is not None
    first = _pass_counter(dom)
    deadline = time.monotonic() + COUNTER_WAIT_S
    while _pass_counter(dom) == first:
        if time.monotonic() > deadline:
            raise BenchError(f"{DOMAIN} runs on {SRC} but its pass counter does not move")
        time.sleep(POLL_S)


def _in_postcopy(b: Bench) -> bool:
    dom = lookup(b.conns[SRC], DOMAIN)
    if dom is None or not dom.isActive():
        return False
    state, reason = dom.state()
    return bool(state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY)


def _downtime(b: Bench, mark: int, landed: bool) -> float | None:
    """The run's downtime from libvirt's job-completed event (only a landed run has one)."""
    if not landed:
        return None
    ev = b.events.wait_outgoing(mark, EVENT_WAIT_S)
    if ev is None:
        b.say(f"    no job-completed event from {SRC} within {EVENT_WAIT_S:g}s")
        if b.events.closed:
            raise BenchError(b.events.closed)
        return None
    return None if ev.downtime_ms is None else float(ev.downtime_ms)


# --- virsh -----------------------------------------------------------------------------------


def virsh_argv(b: Bench, variant: Variant, cap: int) -> list[str]:
    """virsh, from the root namespace, against the source's own libvirtd, with drover's
    destination URI and migration URI (worker/migration_call.handoff_for's)."""
    return [
        "virsh",
        "-c",
        b.hosts[SRC].operator_uri,
        "migrate",
        "--live",
        "--p2p",
        *variant.virsh_flags,
        "--bandwidth",
        str(cap),
        "--migrateuri",
        b.migrate_uri,
        DOMAIN,
        b.dconnuri,
    ]


def _virsh_abort(b: Bench) -> subprocess.CompletedProcess[str]:
    argv = ["virsh", "-c", b.hosts[SRC].operator_uri, "domjobabort", DOMAIN]
    return subprocess.run(argv, capture_output=True, text=True, timeout=VIRSH_CALL_S, check=False)


def _cut_virsh(b: Bench, proc: subprocess.Popen[str]) -> str:
    """Stop a virsh migration at the cut; what was done, in a few words. virsh is gone on
    return and libvirt has no migration job left (abortJob through the API if needed)."""
    aborted = False
    if _in_postcopy(b):
        how = "in post-copy at the cut (cannot be aborted): followed to its end"
    else:
        done = _virsh_abort(b)
        aborted = done.returncode == 0
        err = (done.stderr.strip().splitlines() or ["?"])[-1]
        how = "cut: virsh domjobabort" if aborted else f"cut: domjobabort refused ({err})"
    try:
        proc.wait(ABORT_GRACE_S if aborted else AFTER_CUT_S)
        return how
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    # virsh is gone; a peer-to-peer job is libvirtd's and may outlive its client.
    dom = lookup(b.conns[SRC], DOMAIN)
    if dom is not None and dom.isActive() and dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
        try:
            dom.abortJob()
        except libvirt.libvirtError as exc:
            return f"{how}; virsh killed; abortJob refused: {exc.get_error_message()}"
    return f"{how}; virsh did not return, killed; job aborted through libvirt"


def run_virsh(b: Bench, variant: Variant, cap: int, rep: int) -> Run:
    mark = b.events.mark()
    started = time.perf_counter()
    proc = subprocess.Popen(
        virsh_argv(b, variant, cap), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    b.virsh = proc
    cut: str | None = None
    try:
        _, err = proc.communicate(timeout=b.cut_s)
    except subprocess.TimeoutExpired:
        cut = _cut_virsh(b, proc)
        _, err = proc.communicate()
    wall = time.perf_counter() - started
    b.virsh = None
    where = settled_running(b, variant.label)
    landed = where == DST
    ok = proc.returncode == 0
    if cut is not None:
        outcome = cut + (f", landed on {DST}" if landed else f", back on {SRC}")
    elif ok:
        outcome = "completed"
    else:
        outcome = "virsh failed: " + (err.strip().splitlines() or ["?"])[-1]
    if ok != landed and cut is None:
        outcome += f" (but libvirt shows it on {where})"
    completed = ok and landed and cut is None and wall <= b.cut_s
    return Run(
        variant.key,
        cap,
        rep,
        completed,
        landed,
        wall,
        outcome,
        downtime_ms=_downtime(b, mark, landed),
    )


# --- drover ----------------------------------------------------------------------------------


def _follow(
    b: Bench, job_id: str, timeout: float, seen: dict[str, Event]
) -> tuple[Event, float] | None:
    """Follow the job's stream (jobs/follow.py) for up to `timeout` s, keeping every event in
    `seen` (by stream id; a second follow skips what the first read); (end event, when read)
    or None if the job had not ended by then."""
    store = b.drover.store
    try:
        for eid, event in follow(
            store,
            job_id,
            lambda: store.get(job_id).terminal,
            state=lambda: store.state(job_id).value,
            block_ms=EVENT_BLOCK_MS,
            timeout=max(timeout, 0.001),
        ):
            if eid in seen:
                continue
            seen[eid] = event
            if is_end_event(event):
                return event, time.perf_counter()
    except TimeoutError:
        return None
    return None  # the record ended but its end event never came (the follow's grace)


def run_drover(b: Bench, variant: Variant, cap: int, rep: int) -> Run:
    d = b.drover
    options: dict[str, Any] = {"bandwidth_mib": cap}
    if variant.policy is not None:
        options["policy"] = variant.policy
    mark = b.events.mark()
    started = time.perf_counter()
    job_id = d.submit(domain=DOMAIN, src=SRC, dst=DST, live=True, **options)
    b.job_id = job_id
    seen: dict[str, Event] = {}
    end = _follow(b, job_id, b.cut_s - (time.perf_counter() - started), seen)
    cut: str | None = None
    if end is None and not d.job(job_id).terminal:
        try:
            cut = f"cut: {d.abort(job_id)}"
        except SubmitError as exc:
            cut = f"cut, abort refused ({exc}): followed to its end"
        end = _follow(b, job_id, AFTER_CUT_S, seen)
    # No end event read (a worker that could not write it): the end is when we saw the record.
    ended_at = end[1] if end is not None else time.perf_counter()
    wall = ended_at - started
    job = d.job(job_id)
    b.job_id = None
    if not job.terminal:
        raise BenchError(f"drover job {job_id} is still {job.state.value} after the cut")
    where = settled_running(b, f"drover job {job_id}")
    landed = where == DST
    succeeded = job.state.value == "succeeded"
    if cut is not None:
        outcome = f"{cut}; job {job.state.value}, " + (
            f"landed on {DST}" if landed else f"back on {SRC}"
        )
    elif succeeded:
        outcome = "completed"
    else:
        outcome = f"job {job.state.value}: {job.reason}"
    if succeeded != landed:
        outcome += f" (but libvirt shows it on {where})"
    steps = [e for e in seen.values() if e.get("event") == "policy.step"]
    effective = job.policy
    run = Run(
        variant.key,
        cap,
        rep,
        completed=succeeded and landed and cut is None and wall <= b.cut_s,
        landed=landed,
        wall_s=wall,
        outcome=outcome,
        downtime_ms=_downtime(b, mark, landed),
        job_id=job_id,
        job_state=job.state.value,
        steps=steps,
        policy=effective.name if effective else (variant.policy or DEFAULT_POLICY),
        policy_max_downtime_ms=(
            effective.values.max_downtime_ms
            if effective
            else BUILTIN_POLICIES[variant.policy or DEFAULT_POLICY].max_downtime_ms
        ),
    )
    run.suspended = PolicyAction.SUSPEND.value in run.actions
    return run


# --- the bench -------------------------------------------------------------------------------


def plan(caps: list[int], variants: list[Variant], runs: int) -> Iterator[tuple[int, int, Variant]]:
    """(cap, rep, variant) in the order they run: per cap, `runs` rounds of every variant,
    the variants' order rotated each round so that none always follows the same one."""
    for cap in caps:
        for rep in range(1, runs + 1):
            shift = (rep - 1) % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                yield cap, rep, variant


def _result_line(run: Run) -> str:
    down = f", downtime {run.downtime_ms:.0f} ms" if run.downtime_ms is not None else ""
    steps = f", steps: {' '.join(run.actions)}" if run.steps else ""
    head = "completed" if run.completed else "NOT completed"
    job = f" [job {run.job_id}]" if run.job_id else ""
    return f"    {head} in {run.wall_s:.1f} s{down}{steps}: {run.outcome}{job}"


def _abandon(b: Bench) -> None:
    """Stopped mid-run (an error, Ctrl-C): leave no migration running behind us. A drover job
    is aborted through drover; a virsh one is killed and its job aborted in libvirt (a
    peer-to-peer job is libvirtd's and outlives virsh). Post-copy cannot be aborted: it ends
    by itself. Best effort: the stop's own cause is what gets reported."""
    if b.job_id is not None:
        with contextlib.suppress(Exception):
            b.say(f"stopping: {b.drover.abort(b.job_id)}")
    if b.virsh is not None and b.virsh.poll() is None:
        b.virsh.kill()
        b.virsh.wait()
        with contextlib.suppress(libvirt.libvirtError):
            dom = lookup(b.conns[SRC], DOMAIN)
            if dom is not None and dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                dom.abortJob()
                b.say(f"stopping: aborted the migration virsh had started on {SRC}")


def measure(args: argparse.Namespace, console: Console) -> list[Run]:
    hosts, config = lab_hosts()
    for name in (SRC, DST):
        if name not in hosts:
            raise BenchError(f"the lab has no host {name}")
    start_event_loop()  # before any connection that must deliver events
    conns = {name: libvirt.open(hosts[name].operator_uri) for name in (SRC, DST)}
    listener = JobCompletedListener(hosts[SRC].operator_uri, DOMAIN)
    b = Bench(
        hosts,
        conns,
        Drover(load_settings(config)),
        listener,
        args.cut,
        lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True),
    )
    runs: list[Run] = []
    try:
        todo = list(plan(args.caps, args.variants, args.runs))
        for i, (cap, rep, variant) in enumerate(todo, start=1):
            home(b)
            b.say(f"[{i}/{len(todo)}] {cap} MiB/s, {variant.label}, run {rep}/{args.runs} ...")
            measure_one = run_virsh if variant.tool == "virsh" else run_drover
            run = measure_one(b, variant, cap, rep)
            runs.append(run)
            b.say(_result_line(run))
        home(b)
        return runs
    finally:
        _abandon(b)
        listener.close()
        for conn in conns.values():
            conn.close()


# --- figures ---------------------------------------------------------------------------------


def _censored_median(runs: list[Run]) -> float:
    """The median wall time over all runs, a run not completed within the cut counting as
    longer than any (inf): a row where most runs were cut has no finite median."""
    return statistics.median([r.wall_s if r.completed else math.inf for r in runs])


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else value


def summarise(runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    medians: dict[tuple[int, str], float] = {}
    for cap in args.caps:
        for variant in args.variants:
            mine = [r for r in runs if r.cap_mib == cap and r.variant == variant.key]
            if not mine:
                continue
            median = _censored_median(mine)
            medians[(cap, variant.key)] = median
            downs = [r.downtime_ms for r in mine if r.downtime_ms is not None]
            rows.append(
                {
                    "cap_mib": cap,
                    "variant": variant.key,
                    "label": variant.label,
                    "runs": len(mine),
                    "completed": sum(r.completed for r in mine),
                    "median_wall_s": _finite(median),
                    "median_downtime_ms": statistics.median(downs) if downs else None,
                    "max_downtime_ms": max(downs) if downs else None,
                    # The actions the policy took in this row, in the order first taken.
                    "steps": list(dict.fromkeys(a for r in mine for a in r.actions)),
                }
            )
    for row in rows:
        base = medians.get((row["cap_mib"], BASELINE))
        mine_m = medians[(row["cap_mib"], row["variant"])]
        ratio = None
        drover = BY_KEY[row["variant"]].tool == "drover"
        if drover and base is not None and not math.isinf(base) and not math.isinf(mine_m):
            ratio = mine_m / base
        row["ratio_to_virsh_postcopy"] = ratio
    return {
        "domain": DOMAIN,
        "route": f"{SRC}->{DST}",
        "lab_id": args.lab_id,
        "runs_per_row": args.runs,
        "cut_s": args.cut,
        "rows": rows,
        "targets": targets(runs, medians, args),
        "runs": [asdict(r) for r in runs],
    }


def _target(name: str, status: str, detail: str) -> dict[str, str]:
    return {"target": name, "status": status, "detail": detail}


def targets(
    runs: list[Run], medians: dict[tuple[int, str], float], args: argparse.Namespace
) -> list[dict[str, str]]:
    """Issue 13's targets, each met / NOT met / not measured, with the figures behind it."""
    keys = {v.key for v in args.variants}
    out: list[dict[str, str]] = []
    if DROVER_DEFAULT in keys:
        mine = [r for r in runs if r.variant == DROVER_DEFAULT]
        missed = [f"{c} MiB/s {_k(mine, c)}" for c in args.caps if _k_short(mine, c)]
        out.append(
            _target(
                "drover default: every run completed within the cut at every cap",
                "met" if not missed else "NOT met",
                ", ".join(missed) or f"{len(mine)}/{len(mine)}",
            )
        )
        if BASELINE in keys:
            parts, ok = [], True
            for cap in args.caps:
                mm, base = medians[(cap, DROVER_DEFAULT)], medians[(cap, BASELINE)]
                good = not math.isinf(mm) and mm <= base
                ok = ok and good
                parts.append(f"{cap} MiB/s {_s(mm)} vs {_s(base)}{'' if good else ' (over)'}")
            out.append(
                _target(
                    "drover default: median wall <= virsh --postcopy-after-precopy's, same cap",
                    "met" if ok else "NOT met",
                    "; ".join(parts),
                )
            )
        else:
            out.append(
                _target(
                    "drover default: median wall <= virsh --postcopy-after-precopy's, same cap",
                    "not measured",
                    f"add {BASELINE} to --variants",
                )
            )
        downs = [r.downtime_ms for r in mine if r.downtime_ms is not None]
        landed = [r for r in mine if r.landed]
        missing = len(landed) - len(downs)
        worst = max(downs) if downs else None
        ok = bool(downs) and missing == 0 and worst is not None and worst <= TARGET_DOWNTIME_MS
        detail = f"max {worst:.0f} ms" if worst is not None else "no downtime measured"
        if missing:
            detail += f", {missing} landed run(s) without a downtime from libvirt"
        out.append(
            _target(
                f"drover default: downtime <= {TARGET_DOWNTIME_MS:.0f} ms",
                "met" if ok else ("not measured" if not landed else "NOT met"),
                detail,
            )
        )
    if NO_POSTCOPY in keys:
        mine = [r for r in runs if r.variant == NO_POSTCOPY]
        missed = [f"{c} MiB/s {_k(mine, c)}" for c in args.caps if _k_short(mine, c)]
        out.append(
            _target(
                "no-postcopy: every run completed within the cut",
                "met" if not missed else "NOT met",
                ", ".join(missed) or f"{len(mine)}/{len(mine)}",
            )
        )
        unreported = [r for r in mine if r.landed and r.downtime_ms is None]
        out.append(
            _target(
                "no-postcopy: downtime reported for every run that landed",
                "NOT met"
                if unreported
                else ("met" if any(r.landed for r in mine) else "not measured"),
                f"{len(unreported)} without" if unreported else "all reported",
            )
        )
        over = [
            r
            for r in mine
            if r.downtime_ms is not None
            and r.policy_max_downtime_ms is not None
            and r.downtime_ms > r.policy_max_downtime_ms
        ]
        unexplained = [r for r in over if not r.suspended]
        cap_max = next((r.policy_max_downtime_ms for r in mine), None)
        out.append(
            _target(
                f"no-postcopy: downtime over the policy's max ({cap_max} ms) only with a "
                "suspend step",
                "NOT met"
                if unexplained
                else ("met" if any(r.landed for r in mine) else "not measured"),
                f"{len(over)} over the max, {len(over) - len(unexplained)} with a suspend step"
                + "".join(
                    f"; {r.cap_mib} MiB/s run {r.rep}: {r.downtime_ms:.0f} ms, no suspend step"
                    for r in unexplained
                ),
            )
        )
    return out


def _k(runs: list[Run], cap: int) -> str:
    row = [r for r in runs if r.cap_mib == cap]
    return f"{sum(r.completed for r in row)}/{len(row)}"


def _k_short(runs: list[Run], cap: int) -> bool:
    row = [r for r in runs if r.cap_mib == cap]
    return sum(r.completed for r in row) < len(row)


def _rounded(value: Any) -> Any:
    """Figures to 3 decimals in the JSON (ms and s alike: the clocks are not better)."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _s(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.1f} s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_report(summary: dict[str, Any], console: Console) -> None:
    cut = summary["cut_s"]
    table = Table(
        title=(
            f"{DOMAIN} {summary['route']}, {summary['runs_per_row']} run(s) per row, "
            f"each cut at {cut:g} s"
        )
    )
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("cap", "right"),
        ("variant", "left"),
        (f"completed in {cut:g} s", "right"),
        ("median wall", "right"),
        ("downtime median ms", "right"),
        ("downtime max ms", "right"),
        ("ratio to virsh post-copy", "right"),
        ("policy steps", "left"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name == "variant")
    previous = None
    for row in summary["rows"]:
        if previous is not None and row["cap_mib"] != previous:
            table.add_section()
        previous = row["cap_mib"]
        median = row["median_wall_s"]
        ratio = row["ratio_to_virsh_postcopy"]
        table.add_row(
            f"{row['cap_mib']} MiB/s",
            row["label"],
            f"{row['completed']}/{row['runs']}",
            f"{median:.1f} s" if median is not None else f"> {cut:g} s",
            _ms(row["median_downtime_ms"]),
            _ms(row["max_downtime_ms"]),
            f"{ratio:.2f}" if ratio is not None else "-",
            " ".join(row["steps"]) or "",
        )
    console.print(table)
    console.print(
        "median wall: over every run of the row, a run not completed within the cut counting as "
        "longer; virsh: the command's wall time; drover: submit() to its end event read.\n"
        "downtime: libvirt's job-completed event on the source (`downtime`), runs that landed."
        "\nratio: a drover row's median wall over virsh --postcopy-after-precopy's, same cap.",
        highlight=False,
    )
    console.print("\ntargets (issue 13):", highlight=False)
    for t in summary["targets"]:
        console.print(
            f"  {t['status']:>12}  {t['target']}: {t['detail']}", highlight=False, markup=False
        )


# --- command line ----------------------------------------------------------------------------


def _caps(text: str) -> list[int]:
    try:
        caps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--caps takes MiB/s numbers, like 8,32,64: {text!r}"
        ) from None
    if not caps or any(c < 1 for c in caps):
        raise argparse.ArgumentTypeError(f"--caps takes positive MiB/s numbers: {text!r}")
    return caps


def _variants(text: str) -> list[Variant]:
    keys = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown variant {', '.join(unknown) or '(none)'}; choose from {', '.join(BY_KEY)}"
        )
    return [BY_KEY[k] for k in dict.fromkeys(keys)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--lab-id", type=int, default=DEFAULT_LAB_ID, help="default 5")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs per row (default 3)")
    p.add_argument(
        "--caps",
        type=_caps,
        default=list(DEFAULT_CAPS),
        help="bandwidth caps in MiB/s, comma-separated (default 8,32,64)",
    )
    p.add_argument(
        "--variants",
        type=_variants,
        default=list(VARIANTS),
        help=f"comma-separated, of {', '.join(BY_KEY)} (default: all)",
    )
    p.add_argument("--cut", type=float, default=DEFAULT_CUT_S, help="cut each run at (s), 60")
    p.add_argument("--use-running-lab", action="store_true", help="neither bring up nor down")
    p.add_argument("--json", action="store_true", help="print one JSON object, no table")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if not 0 < args.cut <= AFTER_CUT_S * 10:
        p.error(f"--cut must be between 0 and {AFTER_CUT_S * 10:g} s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in FOREIGN_ENV:
        os.environ.pop(name, None)
    progress = Console(stderr=True, soft_wrap=True)
    try:
        with lab(args.lab_id, args.use_running_lab):
            runs = measure(args, progress)
    except (BenchError, ConfigError, LabError, SubmitError) as exc:
        progress.print(f"bench aborted: {exc}", highlight=False, markup=False)
        return 1
    except KeyboardInterrupt:
        progress.print("bench interrupted", highlight=False, markup=False)
        return 130
    summary = summarise(runs, args)
    if args.json:
        print(json.dumps(_rounded(summary), indent=2))
    else:
        out = Console() if sys.stdout.isatty() else Console(width=REPORT_WIDTH)
        print_report(summary, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
