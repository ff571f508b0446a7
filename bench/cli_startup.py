"""How long the `drover` command takes to answer, as a whole process, on the real lab.

Why this bench exists: a person in a shell and a script calling drover in a loop feel the
command's own start-up every time: Python starting, the imports, Typer reading the commands,
then the work. Issue 17 asks for `drover --help` and `drover jobs --json` (against the lab's
Redis) in at most 150 ms median wall time on this machine, and `drover migrate ... --json` back
(job submitted, its id printed) in at most 250 ms. This bench runs each command as a new
process, `--runs` times, interleaved so that the machine's noise falls on all alike, and prints
the medians beside the bare interpreter's start (`python -c pass`, measured in the same run)
and each command's ratio to it, and for scale the import of the libraries any command that
reads Redis needs before drover's own code (Typer, the pydantic its option parsing uses,
redis-py), and those plus what a migrate needs to sign and publish (Celery, kombu's Redis
transport, Celery's signing serializer), with no target. The migrations move `idle-1` between
the lab's first two hosts, one direction then the other; each job is waited for (untimed) and
the guest checked through libvirt before the next run, so the lab stays as it was.

Every command that has a target, and the two that read a job back, is measured twice: run
where it is typed (DROVER_CLI_SERVER=off: no server of the user's either) and handed to a
`drover cli-server` the bench starts for itself (cli/resident.py says what that server
keeps). The bench counts, from the server's log, that the server ran every one of those.

drover's own modules are byte-compiled first (`python -m compileall`, as pip does for an
installed package and as the Docker image has): with PYTHONDONTWRITEBYTECODE=1 an editable
install would compile them from source in every run. `--no-compile` measures as things are.

It prints figures and never fails on them: a benchmark is not a test. It exits non-zero only
when it could not measure (lab not up, a command failed, a migration did not end where asked).

    .venv/bin/python bench/cli_startup.py [--runs 15] [--lab-id 4] [--use-running-lab] [--json]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from bench.overhead import (
    DOMAIN,
    FOREIGN_ENV,
    BenchError,
    lab,
    lab_hosts,
    note,
    pause_noisy_guest,
    where_running,
)
from config.settings import ConfigError
from lab.proc import LabError

DEFAULT_LAB_ID = 4
MS_PER_S = 1000.0
COMMAND_TIMEOUT_S = 60.0
SERVER_START_S = 30.0
POLL_S = 0.05
# cli/resident.py's names (the bench does not import the CLI it measures).
SWITCH_ENV = "DROVER_CLI_SERVER"
RUNTIME_ENV = "XDG_RUNTIME_DIR"
SETTLE_TIMEOUT_S = 120.0
REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "jobs", "schedules", "worker", "producer", "lab", "cli")
# How a figure's command runs: here (DROVER_CLI_SERVER=off), handed to the bench's own
# `drover cli-server`, or as a user types it (the default: a server started on first use).
HERE, SERVED, AS_TYPED = "here", "served", "as typed"
# Issue 17's targets, median wall ms; printed beside the figures, never asserted.
TARGETS_MS = {"help": 150.0, "jobs": 150.0, "migrate": 250.0}
LIBRARIES = (sys.executable, "-c", "import typer, typer._adapters, redis")
# What a migrate imports on top of those to sign and publish (Celery, kombu's Redis transport,
# Celery's signing serializer and the cryptography under it), still not drover.
PUBLISH_LIBRARIES = "import celery.canvas, celery.security, kombu.transport.redis"


@dataclass
class Figure:
    kind: str  # "baseline", "libraries", "read", or TARGETS_MS's key
    name: str
    argv: list[str]
    target_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    how: str = "here"  # HERE, SERVED or AS_TYPED

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def auto_started_servers(log: Path) -> list[int]:
    """The live servers that `drover` started itself into the bench's runtime directory."""
    pids = [int(p) for p in re.findall(r"listening on .* \(pid (\d+)\)", _text(log))]
    return [pid for pid in pids if _is_server(pid)]


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _is_server(pid: int) -> bool:
    try:
        return b"cli.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@contextmanager
def as_typed(env: dict[str, str]) -> Iterator[tuple[dict[str, str], Path]]:
    """The environment of a user who has never started a server (a runtime directory of the
    bench's own, nothing in it, DROVER_CLI_SERVER unset): the first command starts one
    (cli/autostart.py), as it would for them. Its log, and the servers stopped at the end."""
    runtime = tempfile.mkdtemp(prefix="drv-bench-")
    typed = {k: v for k, v in env.items() if k != SWITCH_ENV} | {RUNTIME_ENV: runtime}
    logs = Path(runtime) / "drover"
    try:
        yield typed, logs
    finally:
        for log in logs.glob("*.log"):
            for pid in auto_started_servers(log):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + SERVER_START_S
        while any(auto_started_servers(log) for log in logs.glob("*.log")):
            if time.monotonic() > deadline:
                raise BenchError("a server drover started did not stop on SIGTERM")
            time.sleep(POLL_S)
        shutil.rmtree(runtime, ignore_errors=True)


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """One run of `argv` as a new process: its wall ms and its stdout; BenchError on failure."""
    started = time.perf_counter()
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=COMMAND_TIMEOUT_S, check=False
    )
    elapsed = (time.perf_counter() - started) * MS_PER_S
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"{' '.join(argv[1:])} exited {done.returncode}: {last}")
    return elapsed, done.stdout


@contextmanager
def cli_server(drover: str, env: dict[str, str]) -> Iterator[tuple[dict[str, str], Path]]:
    """A `drover cli-server` of the bench's own (its own runtime directory, so a server the
    user runs is never measured): the environment its callers use, and its log."""
    runtime = tempfile.mkdtemp(prefix="drv-bench-")
    served = env | {RUNTIME_ENV: runtime}
    log = Path(runtime) / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [drover, "cli-server"], env=served, stdout=out, stderr=out, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while "listening on" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"drover cli-server did not start: {log.read_text().strip()}")
            time.sleep(POLL_S)
        yield served, log
    finally:
        proc.terminate()
        proc.wait(timeout=COMMAND_TIMEOUT_S)
        shutil.rmtree(runtime, ignore_errors=True)


def served_runs(log: Path) -> int:
    """How many commands the server says it ran to their end (cli/server.py's log)."""
    return sum(" ran " in line and ", exit 0" in line for line in _text(log).splitlines())


def compile_packages() -> None:
    """Byte-code for drover's own packages, as an install would leave it."""
    for package in PACKAGES:
        if not compileall.compile_dir(str(REPO / package), quiet=1):
            raise BenchError(f"python -m compileall {package} failed")


def bench(args: argparse.Namespace) -> tuple[list[Figure], dict[str, Any]]:
    from config.settings import load_settings
    from producer.api import Drover

    hosts, config = lab_hosts()
    names = sorted(hosts)
    if len(names) < 2:
        raise BenchError("the lab needs two hosts")
    a, b = names[0], names[1]
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV} | {
        "DROVER_CONFIG": config,
        SWITCH_ENV: "off",  # the rows without a server: no server of the user's either
    }
    drover = str(Path(sys.executable).with_name("drover"))
    d = Drover(load_settings(config))
    conns = {name: libvirt.open(h.operator_uri) for name, h in hosts.items()}
    without = {k: v for k, v in env.items() if k != SWITCH_ENV}
    try:
        # The served rows' callers use the bench's server or none (`manual`): one that stopped
        # (a file it loaded changed) is not replaced by one they start, which the count of
        # what the bench's server ran would miss.
        manual = without | {SWITCH_ENV: "manual"}
        with (
            cli_server(drover, manual) as (served_env, server_log),
            as_typed(without) as (typed_env, typed_logs),
        ):
            at = where_running(conns, DOMAIN)
            if at not in (a, b):
                raise BenchError(f"{DOMAIN} runs on {at}, the bench uses {a} and {b}")
            if not args.use_running_lab:
                pause_noisy_guest(conns)
            figures = [
                Figure("baseline", "python -c pass", [sys.executable, "-c", "pass"]),
                # Not drover: what any command that reads Redis imports before drover's own code
                # (Typer, the pydantic its option parsing uses, redis-py), for scale.
                Figure("libraries", "python -c 'import typer, redis'", [*LIBRARIES]),
                Figure(
                    "libraries",
                    "  ... and celery, kombu, signing",
                    [*LIBRARIES[:-1], f"{LIBRARIES[-1]}; {PUBLISH_LIBRARIES}"],
                ),
                Figure("help", "drover --help", [drover, "--help"], TARGETS_MS["help"]),
                Figure(
                    "jobs", "drover jobs --json", [drover, "jobs", "--json"], TARGETS_MS["jobs"]
                ),
                Figure(
                    "migrate", f"drover migrate {DOMAIN} --live --json", [], TARGETS_MS["migrate"]
                ),
                # No target: the commands that read one job back (the last migrate's).
                Figure("read", "drover job ID --json", [drover, "job", "{id}", "--json"]),
                Figure("read", "drover events ID --json", [drover, "events", "{id}", "--json"]),
            ]
            # The same commands handed to a `drover cli-server`, and as a user types them
            # (the first one starts a server, cli/autostart.py).
            mine = [f for f in figures if f.kind in (*TARGETS_MS, "read")]
            figures += [
                Figure(f.kind, f"{f.name} (served)", f.argv, f.target_ms, how=SERVED) for f in mine
            ]
            figures += [
                Figure(f.kind, f"{f.name} (as typed)", f.argv, f.target_ms, how=AS_TYPED)
                for f in mine
            ]
            envs = {HERE: env, SERVED: served_env, AS_TYPED: typed_env}
            moves: list[str] = []
            last_id = ""
            for run in range(args.warmup + args.runs):
                for fig in figures:
                    fenv = envs[fig.how]
                    if fig.kind == "migrate":
                        dst = b if at == a else a
                        argv = [drover, "migrate", DOMAIN, "--from", at, "--to", dst, "--live"]
                        ms, stdout = timed([*argv, "--json"], fenv)
                        last_id = json.loads(stdout)["job_id"]
                        settle(d, conns, last_id, at, dst)
                        moves.append(f"{at}->{dst}")
                        at = dst
                    elif fig.kind == "read":
                        ms, _ = timed([arg.replace("{id}", last_id) for arg in fig.argv], fenv)
                    else:
                        ms, _ = timed(fig.argv, fenv)
                    if run >= args.warmup or fig.how == AS_TYPED:  # its first: no server yet
                        fig.times_ms.append(ms)
            expected = (args.warmup + args.runs) * sum(f.how == SERVED for f in figures)
            typed_runs = (args.warmup + args.runs) * sum(f.how == AS_TYPED for f in figures)
            typed_served = sum(served_runs(log) for log in typed_logs.glob("*.log"))
            if not typed_served:
                raise BenchError("no command typed as a user would was served: no server started")
            if served_runs(server_log) != expected:
                other = [ln for ln in _text(server_log).splitlines() if ", exit 0" not in ln]
                raise BenchError(
                    f"the server ran {served_runs(server_log)} of the {expected} served "
                    f"commands; its other lines: {other}"
                )
    finally:
        for conn in conns.values():
            conn.close()
    return figures, {
        "moves": moves,
        "domain": DOMAIN,
        "hosts": [a, b],
        "as_typed_served": typed_served,
        "as_typed_runs": typed_runs,
    }


def settle(d: Any, conns: dict[str, libvirt.virConnect], job_id: str, src: str, dst: str) -> None:
    """Untimed: the job has ended, succeeded, and libvirt shows the guest on `dst` alone."""
    try:
        job = d.wait(job_id, SETTLE_TIMEOUT_S)
    except TimeoutError as exc:
        raise BenchError(f"job {job_id}: {exc}") from None
    if job.state.value != "succeeded":
        raise BenchError(f"job {job_id} {src}->{dst} {job.state.value}: {job.reason}")
    found = where_running(conns, DOMAIN)
    if found != dst:
        raise BenchError(f"after job {job_id} {src}->{dst}: {DOMAIN} runs on {found}")


def summarise(
    figures: list[Figure], extra: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    base = figures[0].median_ms
    rows = []
    for fig in figures:
        row: dict[str, Any] = {
            "command": fig.name,
            "median_ms": round(fig.median_ms, 1),
            "min_ms": round(min(fig.times_ms), 1),
            "max_ms": round(max(fig.times_ms), 1),
            "ratio_to_python": round(fig.median_ms / base, 2),
            "runs": len(fig.times_ms),
        }
        if fig.target_ms is not None:
            row |= {"target_ms": fig.target_ms, "target_met": fig.median_ms <= fig.target_ms}
        rows.append(row)
    return {
        "lab_id": args.lab_id,
        "runs": args.runs,
        "warmup": args.warmup,
        "bytecode": "as is" if args.no_compile else "compiled by the bench",
        "pythondontwritebytecode": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
        "figures": rows,
        **extra,
    }


def print_report(summary: dict[str, Any]) -> None:
    print(f"{'command':46} {'median ms':>9} {'min':>7} {'max':>7} {'x python':>8}  target")
    for row in summary["figures"]:
        target = ""
        if "target_ms" in row:
            met = "met" if row["target_met"] else "NOT met"
            target = f"<= {row['target_ms']:.0f} ms: {met}"
        print(
            f"{row['command']:46} {row['median_ms']:9.1f} {row['min_ms']:7.1f} "
            f"{row['max_ms']:7.1f} {row['ratio_to_python']:8.2f}  {target}"
        )
    print(
        f"\n{summary['runs']} runs each (+{summary['warmup']} warm-up), interleaved; each a new "
        f"process, wall time. drover's bytecode: {summary['bytecode']}."
        f"\nmigrations: {DOMAIN} moved {len(summary['moves'])} times between "
        f"{' and '.join(summary['hosts'])}, each job waited for and checked through libvirt."
        f"\n(served): handed to a `drover cli-server` the bench started first. (as typed): "
        f"DROVER_CLI_SERVER unset and no server up at the start, its warm-up run counted: the "
        f"first command starts one; {summary['as_typed_served']} of the "
        f"{summary['as_typed_runs']} were served. The rest: DROVER_CLI_SERVER=off."
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=15, help="measured runs per command (15)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    p.add_argument("--lab-id", type=int, default=DEFAULT_LAB_ID, help="default 4")
    p.add_argument("--use-running-lab", action="store_true", help="neither bring up nor down")
    p.add_argument("--no-compile", action="store_true", help="do not byte-compile drover first")
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
        if not args.no_compile:
            compile_packages()
        with lab(args.lab_id, args.use_running_lab):
            figures, extra = bench(args)
    except (BenchError, ConfigError, LabError, subprocess.TimeoutExpired) as exc:
        note(f"bench aborted: {exc}")
        return 1
    summary = summarise(figures, extra, args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
