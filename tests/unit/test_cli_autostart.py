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
import select
import shutil
import signal
import socket
import subprocess
import sys
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
        return Path(resident.socket_path(self.env))

    @property
    def log_path(self) -> Path:
        return Path(resident.log_path(self.env))

    def log(self, env: dict[str, str] | None = None) -> str:
        """The log of the server for `env` on top of this runtime's environment."""
        try:
            return Path(resident.log_path(self.env_with(env))).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def env_with(self, env: dict[str, str] | None) -> dict[str, str]:
        return self.env | (env or {})

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

    def listening(self, env: dict[str, str] | None = None) -> list[int]:
        """The pids the server log says listened (one line per server that took the lock)."""
        found = re.findall(rf"{LISTENING} .* \(pid (\d+)\)", self.log(env))
        return [int(pid) for pid in found]

    def served(self, env: dict[str, str] | None = None) -> list[str]:
        return [line for line in self.log(env).splitlines() if " ran " in line]

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
    """Every live `cli.server` process whose directory is `directory` (its runtime's)."""
    mine = f"{resident.RUNTIME_ENV}={directory.parent}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cli.server" in argv and mine in env:
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
        (resident.IDLE_ENV, "1_0"),  # Python's float() reads it as 10
        (resident.IDLE_ENV, "1e-300"),  # a server per command, gone at once
        (resident.IDLE_ENV, "0.5"),
        (resident.IDLE_ENV, "\u00b2"),  # a digit to str.isdigit(), not to float()
    ],
)
@pytest.mark.parametrize("command", [["jobs", "--json"], ["hosts"]])
@pytest.mark.parametrize("switch", ["auto", "manual"])
def test_a_bad_setting_is_one_line_and_exit_2(
    runtime: Runtime, name: str, value: str, command: list[str], switch: str
) -> None:
    """Whatever the command and the mode (a bad idle time under `manual` too)."""
    done = runtime.drover(*command, **({resident.SWITCH_ENV: switch} | {name: value}))
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"drover: {name} must be ") and repr(value) in line, line
    assert not runtime.socket.exists() and servers_of(runtime.directory) == []


def test_the_server_keeps_none_of_its_first_callers_descriptors_or_directory(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Probe: a pipe (or a flock(1) lock) the first caller had open stayed open in the server
    for its whole life: a script reading the pipe waited for the server's idle stop."""
    read_end, write_end = os.pipe()
    try:
        done = subprocess.run(
            [DROVER, "jobs", "--json"],
            env=runtime.env,
            cwd=tmp_path,
            pass_fds=(write_end,),
            capture_output=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        pid = runtime.server_pid()
        os.close(write_end)
        write_end = -1
        ready, _, _ = select.select([read_end], [], [], DEADLINE_S)
        assert ready and os.read(read_end, 1) == b"", "the pipe is still held open"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert sorted(os.listdir(f"/proc/{pid}/fd")) != []
    held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert not [h for h in held if str(tmp_path) in h], held
    assert os.readlink(f"/proc/{pid}/cwd") == str(runtime.directory)  # not the caller's


SHADOW = """import json
_real = json.dumps
json.dumps = lambda v, *args, **kwargs: '["shadowed"]' if v == [] else _real(v, *args, **kwargs)
"""


def test_a_caller_with_another_module_path_gets_a_server_of_its_own(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Probe: a later caller ran with the first caller's PYTHONPATH (and its sitecustomize):
    its `drover jobs --json` printed what the first caller's code made of it."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text(SHADOW)
    shadowed = {"PYTHONPATH": str(shadow)}
    here = runtime.drover("jobs", "--json", **shadowed, **{resident.SWITCH_ENV: resident.OFF})
    assert here.stdout.strip() == '["shadowed"]', here.stderr  # what that caller's code prints
    assert runtime.drover("jobs", "--json", **shadowed).stdout.strip() == '["shadowed"]'
    until("its server listens", lambda: len(runtime.listening(shadowed)) == 1)
    for _ in range(2):  # the first starts a server of its own, the second is served by it
        plain = runtime.drover("jobs", "--json")
        assert (plain.returncode, plain.stdout.strip()) == (0, "[]"), plain.stderr
    until("both serve", lambda: len(runtime.listening()) == 1)
    assert runtime.listening() != runtime.listening(shadowed)
    served = runtime.drover("jobs", "--json", **shadowed)
    assert served.stdout.strip() == '["shadowed"]'  # served as it runs here
    until("it is served", lambda: len(runtime.served(shadowed)) == 1)


def test_a_server_refuses_a_linked_directory_and_a_fifo_for_its_log(runtime: Runtime) -> None:
    """Its directory is opened without following a link and checked on the descriptor; its
    log and lock must be regular files of the user's (a FIFO would hold it forever)."""
    top = runtime.directory.parent
    elsewhere = top / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    runtime.directory.symlink_to(elsewhere)
    refused = server_run(runtime)
    assert refused.returncode == 1 and "cannot use" in refused.stderr, refused.stderr
    assert os.listdir(elsewhere) == []
    runtime.directory.unlink()
    runtime.directory.mkdir(mode=0o700)
    os.mkfifo(runtime.log_path)
    refused = server_run(runtime, "--log")
    assert refused.returncode == 1 and servers_of(runtime.directory) == []
    assert not runtime.socket.exists()


def server_run(runtime: Runtime, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m cli.server ARGS` as drover starts one (its stderr: what it says on error)."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "cli.server", "--idle", "1", *args],
        env=runtime.env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
