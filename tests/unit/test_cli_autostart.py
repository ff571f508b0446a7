"""`drover` starts its user's cli-server itself (DROVER_CLI_SERVER=auto, the default): the first
served command runs where it is typed and leaves a server behind, the next ones are served;
the server stops after its idle time; one server whatever the number of commands that found
none; `manual` and `off` start none; a bad setting is one line and exit 2.

Real processes throughout: the `drover` script a user types, the server it starts, the real
test Redis. Which process ran a command is read from the server's log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli import resident
from cli.server import LISTENING
from jobs.spec import MigrationSpec
from jobs.store import JobStore
from jobs.submission import enqueue
from tests.support.cli import CLI_TIMEOUT_S
from tests.unit.test_cli_server import DEADLINE_S, DROVER, callers_env, until

IDLE_S = 60.0  # long enough that a test's server stays up while it is used
SHORT_IDLE_S = 1.0
STARTED_TOGETHER = 4


@dataclass
class Runtime:
    """A caller's environment of its own: its server's directory, auto, an idle time."""

    env: dict[str, str]
    directory: Path  # where the server's socket, lock and log are

    @property
    def socket(self) -> Path:
        return self.directory / Path(resident.socket_path()).name

    @property
    def log_path(self) -> Path:
        return self.directory / Path(resident.log_path()).name

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def drover(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """`drover ARGS` as a user types it; a server it leaves behind must not hold its
        pipes (a hung run fails on the timeout)."""
        return subprocess.run(
            [DROVER, *args],
            capture_output=True,
            text=True,
            env=self.env | env,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )

    def listening(self) -> list[int]:
        """The pids the server log says listened (one line per server that took the lock)."""
        return [int(pid) for pid in re.findall(rf"{LISTENING} .* \(pid (\d+)\)", self.log())]

    def served(self) -> list[str]:
        return [line for line in self.log().splitlines() if " ran " in line]

    def server_pid(self) -> int:
        until("the server listens", lambda: len(self.listening()) == 1)
        (pid,) = self.listening()
        return pid


def gone(pid: int) -> bool:
    """The process has ended: reaped, or a zombie (its files closed, its socket too)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def servers_of(directory: Path) -> list[int]:
    """Every live `cli.server` process whose log is in `directory` (one started by drover)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cli.server" in argv and any(str(directory).encode() in a for a in argv):
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def runtime(config: Path) -> Iterator[Runtime]:
    top = tempfile.mkdtemp(prefix="drv-")  # short: a Unix socket's path has at most 107 bytes
    env = callers_env(top, config) | {
        resident.SWITCH_ENV: resident.AUTO,
        resident.IDLE_ENV: str(IDLE_S),
        "CELERY_BROKER_URL": "redis://:secret@127.0.0.1:1/0",  # no command here reads it
    }
    rt = Runtime(env, Path(top) / "drover")
    try:
        yield rt
    finally:
        for pid in servers_of(rt.directory):
            os.kill(pid, signal.SIGTERM)
        until("the servers have stopped", lambda: not servers_of(rt.directory))
        shutil.rmtree(top, ignore_errors=True)


def test_the_first_command_starts_a_server_and_the_next_one_is_served(runtime: Runtime) -> None:
    first = runtime.drover("jobs", "--json")
    assert (first.returncode, json.loads(first.stdout), first.stderr) == (0, [], "")
    pid = runtime.server_pid()
    assert os.getsid(pid) == pid  # a session of its own: no terminal's hang-up reaches it
    assert runtime.served() == []  # the first one ran where it was typed
    second = runtime.drover("jobs", "--json")
    assert (second.returncode, json.loads(second.stdout), second.stderr) == (0, [], "")
    until("the server logs it", lambda: len(runtime.served()) == 1)
    assert " ran jobs, exit 0" in runtime.served()[0]
    assert servers_of(runtime.directory) == [pid]
    assert oct(runtime.log_path.stat().st_mode & 0o777) == oct(0o600)
    # It keeps none of its first caller's drover settings (a Redis URL may hold a password).
    kept = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in kept if v.startswith((b"DROVER_", b"CELERY_"))], kept


def test_commands_it_does_not_serve_start_no_server(runtime: Runtime) -> None:
    done = runtime.drover("hosts", "--json")
    assert done.returncode == 0, done.stderr
    assert not runtime.socket.exists() and servers_of(runtime.directory) == []


def test_an_idle_server_stops_and_the_next_command_starts_another(runtime: Runtime) -> None:
    assert runtime.drover("jobs", "--json", **{resident.IDLE_ENV: "1"}).returncode == 0
    pid = runtime.server_pid()
    until("the idle server stops", lambda: gone(pid) and not runtime.socket.exists())
    assert f"no command line for {SHORT_IDLE_S:g} s; it stops" in runtime.log()
    assert runtime.drover("jobs", "--json").returncode == 0
    until("a new server listens", lambda: runtime.listening() not in ([], [pid]))
    assert runtime.listening() != [pid] and len(runtime.listening()) == 1  # its own log


def test_commands_started_together_leave_one_server(runtime: Runtime) -> None:
    procs = [
        subprocess.Popen(
            [DROVER, "jobs", "--json"],
            env=runtime.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(STARTED_TOGETHER)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
        assert (proc.returncode, json.loads(out), err) == (0, [], "")
    pid = runtime.server_pid()
    until("the others have ended", lambda: servers_of(runtime.directory) == [pid])
    assert runtime.drover("jobs", "--json").returncode == 0
    until("it is served", lambda: len(runtime.served()) == 1)


def test_a_socket_left_by_a_killed_server_is_replaced(runtime: Runtime) -> None:
    assert runtime.drover("jobs", "--json").returncode == 0
    pid = runtime.server_pid()
    os.kill(pid, signal.SIGKILL)
    until("it is gone", lambda: gone(pid))
    assert runtime.socket.exists()  # left behind: nothing answers on it
    with pytest.raises(ConnectionRefusedError), socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(runtime.socket))
    assert runtime.drover("jobs", "--json").returncode == 0
    until("another listens", lambda: runtime.listening() not in ([], [pid]))
    assert runtime.drover("jobs", "--json").returncode == 0
    until("it is served", lambda: len(runtime.served()) == 1)


def test_a_command_running_on_does_not_keep_the_next_server_from_starting(
    runtime: Runtime, store: JobStore
) -> None:
    """A served `events --follow` runs in a child of the server; the server stops when idle
    and the child must not hold its lock: the next command's server starts."""
    job_id = enqueue(store, MigrationSpec(domain="web-1", src="kvm1", dst="kvm2"), origin="t")
    short = {resident.IDLE_ENV: str(SHORT_IDLE_S)}
    assert runtime.drover("jobs", "--json", **short).returncode == 0
    first = runtime.server_pid()
    follow = subprocess.Popen(
        [DROVER, "events", job_id, "--follow", "--json"],
        env=runtime.env | short,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        until("the follow is served and reads the record", lambda: _following(store))
        until("the first server stops", lambda: gone(first))
        assert follow.poll() is None  # still following, in the old server's child
        assert runtime.drover("jobs", "--json").returncode == 0
        until("a second server listens", lambda: runtime.listening() not in ([], [first]))
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=DEADLINE_S)


def _following(store: JobStore) -> bool:
    clients = store.r.client_list()
    return any(c["cmd"] == "xread" and "b" in c["flags"] for c in clients)


@pytest.mark.parametrize("switch", ["manual", "off", "OFF", " Manual "])
def test_manual_and_off_start_no_server(runtime: Runtime, switch: str) -> None:
    done = runtime.drover("jobs", "--json", **{resident.SWITCH_ENV: switch})
    assert (done.returncode, json.loads(done.stdout)) == (0, [])
    assert not runtime.socket.exists() and servers_of(runtime.directory) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (resident.SWITCH_ENV, "sometimes"),
        (resident.SWITCH_ENV, "0"),
        (resident.IDLE_ENV, "0"),
        (resident.IDLE_ENV, "-5"),
        (resident.IDLE_ENV, "nan"),
        (resident.IDLE_ENV, "inf"),
        (resident.IDLE_ENV, "1e9"),
        (resident.IDLE_ENV, "ten"),
    ],
)
@pytest.mark.parametrize("command", [["jobs", "--json"], ["hosts"]])
def test_a_bad_setting_is_one_line_and_exit_2(
    runtime: Runtime, name: str, value: str, command: list[str]
) -> None:
    done = runtime.drover(*command, **{name: value})
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"drover: {name} must be ") and repr(value) in line, line
    assert not runtime.socket.exists() and servers_of(runtime.directory) == []
