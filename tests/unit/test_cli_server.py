"""`drover cli-server`: a served command is the same command, as its caller sees it (output,
streams, exit code, environment, directory, Ctrl-C), and the server is never needed.

Real processes throughout: the server as `drover cli-server` runs it, the `drover` script a
user types, the real test Redis. Which process ran a command is read from the server's log.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli import resident
from cli.server import LISTENING
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue
from producer.cli import COMMAND_NAMES
from tests.support.cli import CLI_TIMEOUT_S

DROVER = str(Path(sys.executable).parent / "drover")
DEADLINE_S = 20.0
POLL_S = 0.05


def until(what: str, check: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(POLL_S)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def until_listening(log_path: Path) -> None:
    """Wait for the server's own word that it listens. Not by connecting to it: the server
    forks a child for every connection, a probe's too, and a test that counts the server's
    children must see only its callers' (CI once took a probe's child for a caller's)."""
    until("the server listens", lambda: LISTENING in log_path.read_text(errors="replace"))


@dataclass
class Server:
    env: dict[str, str]  # the callers' environment: the server's runtime dir, the config
    log_path: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> str:
        return resident.socket_path(self.env)

    def log(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def ran(self) -> list[str]:
        return [line for line in self.log() if " ran " in line or " declined: " in line]

    def drover(
        self, *args: str, env: dict[str, str] | None = None, cwd: Path | str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DROVER, *args],
            capture_output=True,
            text=True,
            env=self.env if env is None else env,
            cwd=cwd,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )


def callers_env(runtime: str, config: Path | None = None) -> dict[str, str]:
    """A caller's environment with `runtime` for its server's directory. `manual`: these tests
    start the server they use; those of one `drover` starts itself set `auto` (and an idle
    time) on top (tests/unit/test_cli_autostart.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROVER_")}
    env |= {resident.RUNTIME_ENV: runtime, resident.SWITCH_ENV: resident.MANUAL}
    if config is not None:
        env["DROVER_CONFIG"] = str(config)
    return env


def start_server(
    runtime: str, log_path: Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [DROVER, "cli-server"],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=cwd,
        )


@pytest.fixture
def server(config: Path, tmp_path: Path) -> Iterator[Server]:
    # A short directory of its own (a Unix socket's path has at most 107 bytes).
    runtime = tempfile.mkdtemp(prefix="drv-")
    env = callers_env(runtime, config)
    log_path = tmp_path / "server.log"
    proc = start_server(runtime, log_path, env)
    srv = Server(env, log_path, proc)
    try:
        until_listening(log_path)
        yield srv
    finally:
        proc.terminate()
        proc.wait(timeout=DEADLINE_S)
        shutil.rmtree(runtime, ignore_errors=True)


def same_both_ways(
    srv: Server, *args: str, env: dict[str, str] | None = None, cwd: str | None = None
) -> str:
    """The command line gives the same exit code, stdout and stderr with the server (if it
    serves it) as run here; what it printed."""
    env = srv.env if env is None else env
    served = srv.drover(*args, env=env, cwd=cwd)
    local = srv.drover(*args, env=env | {resident.SWITCH_ENV: resident.OFF}, cwd=cwd)
    assert (served.returncode, served.stdout, served.stderr) == (
        local.returncode,
        local.stdout,
        local.stderr,
    ), args
    return served.stdout + served.stderr


def test_the_served_commands_are_the_job_commands() -> None:
    """cli/resident.py keeps its own list (it must not import the CLI to read it)."""
    assert resident.SERVED == COMMAND_NAMES


def test_a_served_command_answers_as_the_same_command_run_here(
    server: Server, store: JobStore
) -> None:
    job_id = enqueue(store, MigrationSpec(domain="web-1", src="kvm1", dst="kvm2"), origin="t")
    assert store.transition(job_id, JobState.CANCELLED, host="t", reason="test")[0]  # still
    lines: tuple[list[str], ...] = (
        ["jobs", "--json"],
        ["job", job_id, "--json"],
        ["events", job_id, "--json"],
        ["job", "nosuchjob000", "--json"],  # refused: rc 2, one line
        ["migrate", "web-2", "--from", "kvm1"],  # a usage error
        ["migrate", "web-2", "--from", "kvm1", "--to", "kvm1", "--json"],  # refused
        ["--help"],
        [],
    )
    for args in lines:
        same_both_ways(server, *args)
    assert json.loads(server.drover("jobs", "--json").stdout)[0]["id"] == job_id
    ran = server.ran()
    assert len(ran) == len(lines) + 1 and all(" ran " in line for line in ran), ran
    assert "ran job, exit 2" in ran[3] and "ran migrate, exit 2" in ran[4]


def test_a_served_command_takes_its_callers_environment_and_directory(
    server: Server, config: Path, store: JobStore
) -> None:
    job_id = enqueue(store, MigrationSpec(domain="web-1", src="kvm1", dst="kvm2"), origin="t")
    elsewhere = {k: v for k, v in server.env.items() if k != "DROVER_CONFIG"}
    # The config named relative to the caller's directory, and through the caller's env.
    by_path = server.drover("--config", config.name, "job", job_id, "--json", cwd=config.parent)
    assert by_path.returncode == 0, by_path.stderr
    assert json.loads(by_path.stdout)["id"] == job_id
    # Without DROVER_CONFIG (the server has it): whatever drover does then, it does served.
    assert job_id not in same_both_ways(server, "jobs", "--json", env=elsewhere, cwd="/")
    assert len(server.ran()) == 2


def test_commands_it_does_not_serve_run_where_they_are_typed(server: Server) -> None:
    for args in (["lab", "--help"], ["policies", "--help"], ["nosuch"]):
        same_both_ways(server, *args)
    assert server.ran() == []


def test_ctrl_c_reaches_a_served_command_and_a_vanished_caller_ends_it(
    server: Server, store: JobStore
) -> None:
    job_id = enqueue(store, MigrationSpec(domain="web-1", src="kvm1", dst="kvm2"), origin="t")
    follow = [DROVER, "events", job_id, "--follow"]
    caller = subprocess.Popen(
        follow, env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    until("the follow is served", lambda: len(running(server)) == 1)
    assert "queued" in first_line(caller)  # the command runs: its first event is out
    (child,) = running(server)
    caller.send_signal(signal.SIGTSTP)  # Ctrl-Z: the command stops, then its caller
    until("both stopped", lambda: state(child) == "T" and state(caller.pid) == "T")
    caller.send_signal(signal.SIGCONT)  # `fg`
    until("both go on", lambda: state(child) != "T" and state(caller.pid) != "T")
    caller.send_signal(signal.SIGINT)
    _, said = caller.communicate(timeout=DEADLINE_S)
    assert caller.returncode == 130, (said, server.log())
    until("the server logs it", lambda: any("ran events, exit 130" in x for x in server.ran()))

    caller = subprocess.Popen(follow, env=server.env, stdout=subprocess.PIPE, text=True)
    until("a second follow runs", lambda: len(running(server)) == 1)
    (child,) = running(server)
    caller.kill()  # no chance to pass anything on: the server's child notices and ends
    caller.wait(timeout=DEADLINE_S)
    until(f"the served command {child} ends with its caller", lambda: not alive(child))


def first_line(proc: subprocess.Popen[str]) -> str:
    """The first line `proc` writes to its stdout (within the deadline)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], DEADLINE_S)
    assert ready, f"no output within {DEADLINE_S} s"
    return proc.stdout.readline()


def state(pid: int) -> str:
    """The process's state letter (R, S, T for stopped...), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def running(server: Server) -> list[int]:
    """The server's children: a served command each."""
    return children(server.proc.pid)


def test_a_killed_command_is_an_error_not_a_success(server: Server, store: JobStore) -> None:
    job_id = enqueue(store, MigrationSpec(domain="web-1", src="kvm1", dst="kvm2"), origin="t")
    caller = subprocess.Popen(
        [DROVER, "events", job_id, "--follow"],
        env=server.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    until("the follow runs", lambda: len(running(server)) == 1)
    os.kill(running(server)[0], signal.SIGKILL)
    assert caller.wait(timeout=DEADLINE_S) == 1
    assert caller.stderr is not None
    assert "ended without an exit status" in caller.stderr.read()


def test_a_directory_others_can_enter_is_not_used(server: Server) -> None:
    directory = os.path.dirname(server.socket)
    os.chmod(directory, 0o755)
    try:
        done = server.drover("jobs", "--json")
        assert done.returncode == 0 and json.loads(done.stdout) == []
        assert server.ran() == []  # ran here, not by the server
    finally:
        os.chmod(directory, 0o700)


def test_a_second_server_and_an_open_directory_are_refused_in_one_line(
    server: Server, tmp_path: Path
) -> None:
    second = server.drover("cli-server")
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"drover cli-server: a drover cli-server already runs for {server.socket}"
    ]
    runtime = tempfile.mkdtemp(prefix="drv-")
    try:
        os.makedirs(os.path.join(runtime, "drover"), mode=0o755)
        os.chmod(os.path.join(runtime, "drover"), 0o755)
        refused = server.drover("cli-server", env=server.env | {resident.RUNTIME_ENV: runtime})
        assert refused.returncode == 1 and "mode 0700" in refused.stderr, refused.stderr
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_an_upgraded_library_stops_the_server_and_the_command_runs_here(
    config: Path, tmp_path: Path
) -> None:
    runtime = tempfile.mkdtemp(prefix="drv-")
    packages = tmp_path / "site"  # a directory of installed packages, on the server's path
    packages.mkdir()
    env = callers_env(runtime, config)
    log_path = tmp_path / "server.log"
    started_in = tmp_path / "home"  # where it was started: not its module path
    started_in.mkdir()
    env |= {"PYTHONPATH": str(packages)}  # the callers' too: a start-up variable
    proc = start_server(runtime, log_path, env, started_in)
    srv = Server(env, log_path, proc)
    try:
        until_listening(log_path)
        (started_in / "notes.txt").write_text("a file of the user's")
        assert srv.drover("jobs", "--json").returncode == 0
        (packages / "newly_installed.py").write_text("")
        done = srv.drover("jobs", "--json")
        assert done.returncode == 0 and json.loads(done.stdout) == []
        assert proc.wait(timeout=DEADLINE_S) == 0
        assert not os.path.exists(srv.socket)
        until("the server logs both", lambda: len(srv.ran()) == 2)
        ran = srv.ran()
        assert " ran jobs, exit 0" in ran[0] and "libraries changed" in ran[1], ran
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=DEADLINE_S)
        shutil.rmtree(runtime, ignore_errors=True)


# A process that adopts its orphaned descendants (a subreaper, as init or a service manager
# is) and writes down the signals it gets and the processes it reaps.
REAPER = """
import ctypes, os, signal, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
record = open(sys.argv[1], "a", buffering=1)

def reap(signum, frame):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        record.write(f"reaped {pid}\\n")

signal.signal(signal.SIGCHLD, reap)
signal.signal(signal.SIGTERM, lambda signum, frame: record.write("SIGTERM\\n"))
server = subprocess.Popen(sys.argv[2:], stdout=sys.stderr)
record.write(f"server {server.pid}\\n")
while True:
    signal.pause()
"""


def test_a_child_whose_server_died_never_signals_the_process_that_adopted_it(
    config: Path, tmp_path: Path
) -> None:
    """A child finding the server's libraries changed stops its server. Once the server has
    died, the child's parent is whoever adopted it (init, as root): that one is left alone."""
    runtime = tempfile.mkdtemp(prefix="drv-")
    packages = tmp_path / "site"
    packages.mkdir()
    record = tmp_path / "reaper.log"
    log_path = tmp_path / "server.log"
    env = callers_env(runtime) | {"PYTHONPATH": str(packages)}
    with log_path.open("ab") as log:  # the reaper's stderr: the server's too
        reaper = subprocess.Popen(
            [sys.executable, "-c", REAPER, str(record), DROVER, "cli-server"],
            env=env,
            stderr=log,
            start_new_session=True,
        )
    path = resident.socket_path(env)
    try:
        until_listening(log_path)
        (server_pid,) = [
            int(x.split()[1]) for x in record.read_text().splitlines() if "server" in x
        ]
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)  # the server forks a child for it, which waits for the request
            until("the child is forked", lambda: len(children(server_pid)) == 1)
            os.kill(server_pid, signal.SIGKILL)
            until("the reaper has the server", lambda: f"reaped {server_pid}" in record.read_text())
            (packages / "newly_installed.py").write_text("")  # the libraries changed
            request = {
                "argv": [DROVER, "jobs", "--json"],
                "env": resident.startup_env(env) | {"DROVER_CONFIG": str(config)},
                "cwd": "/",
                "umask": 0o022,
                "install": resident.INSTALL,
            }
            with open(os.devnull, "r+b") as null:
                fds = [null.fileno()] * len(resident.STDIO)
                socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], fds)
            reply = json.loads(conn.makefile("rb").readline())
        assert "libraries changed" in reply["declined"], reply
        until("the child is reaped too", lambda: record.read_text().count("reaped") == 2)
        assert "SIGTERM" not in record.read_text()
    finally:
        reaper.kill()
        reaper.wait(timeout=DEADLINE_S)
        shutil.rmtree(runtime, ignore_errors=True)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(line) for line in out.stdout.split()]


# What the server's preload of drover's own modules reads: every environment variable asked
# for and every file opened other than a module's own, after the third-party preload (whose
# libraries read what they read as they are imported in any process).
PRELOAD_READS = """
import importlib, json, os, sys
from cli import server
from pydantic import TypeAdapter
for name in server.PRELOAD:
    importlib.import_module(name)
TypeAdapter(int)
asked, opened = set(), []
real = os.environ

class Spy(dict):
    def __getitem__(self, key):
        asked.add(key)
        return real[key]

    def get(self, key, default=None):
        asked.add(key)
        return real.get(key, default)

    def __contains__(self, key):
        asked.add(key)
        return key in real

def hook(event, args):
    if event == "open" and isinstance(args[0], str):
        if not args[0].endswith((".py", ".pyc", ".so")):
            opened.append(args[0])

sys.addaudithook(hook)
os.environ = Spy(real)
stamp = server.preload()
os.environ = real
print(json.dumps({
    "asked": sorted(asked),
    "opened": opened,
    "loaded": sorted(sys.modules),
    "stamped": sorted(stamp),
}))
"""
# pydantic asks whether its plugins are disabled as it builds a model; it loads them (or not)
# once per process, at the first schema, which the third-party preload has built already.
PYDANTIC_ASKS = {"PYDANTIC_DISABLE_PLUGINS"}


def test_the_drover_modules_the_server_preloads_read_nothing_at_import() -> None:
    """What the server imports before a fork must be the same whoever calls: drover modules
    that read no environment variable and no file as they are imported. The Celery app (made
    as config.celery is imported, reading CELERY_* variables) is left to each child; each
    preloaded module's file is in the stamp a child compares before it runs a command."""
    from cli.server import DROVER_PRELOAD

    done = subprocess.run(
        [sys.executable, "-P", "-c", PRELOAD_READS],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=True,
        cwd=resident.INSTALL,
    )
    reads = json.loads(done.stdout)
    assert set(reads["asked"]) <= PYDANTIC_ASKS, reads["asked"]
    assert reads["opened"] == []
    assert set(DROVER_PRELOAD) <= set(reads["loaded"])
    assert "config.celery" not in reads["loaded"]
    drover_files = {
        os.path.join(resident.INSTALL, *name.split(".")) + ".py"
        for name in ("jobs.spec", "producer.cli", "cli.main", "config.settings_model")
    }
    assert drover_files <= set(reads["stamped"])


def test_an_edited_drover_module_stops_the_server_and_the_command_runs_here(
    server: Server,
) -> None:
    """A module the server preloaded is changed on disk (its modification time is enough):
    the next command is declined and run where it was typed, and the server stops."""
    edited = Path(resident.INSTALL, "producer", "jobs_list.py")
    before = edited.stat()
    assert server.drover("jobs", "--json").returncode == 0
    try:
        os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        done = server.drover("jobs", "--json")
    finally:
        os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert done.returncode == 0 and json.loads(done.stdout) == []
    assert server.proc.wait(timeout=DEADLINE_S) == 0
    until("the server logs both", lambda: len(server.ran()) == 2)
    ran = server.ran()
    assert " ran jobs, exit 0" in ran[0] and "libraries changed" in ran[1], ran
