"""`drover`: hand the command line to this user's `drover cli-server` if one is up, else run
it in this process (cli/main.py). cli/resident.py says why and how.

The hand-over changes nothing the caller sees: the same output on the same streams, the same
exit code, Ctrl-C and other signals passed on to the command. Whenever the server cannot take
the command line (none is up, it declines the command, its directory is not private, a
standard stream is closed), the command runs here, so a server is never needed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

from cli import resident

# The typing module alone costs a served command 3 ms; mypy reads this name as typing's.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType
    from typing import Any

# Signals the caller's terminal or supervisor sends to `drover` that the command must get
# (SIGCONT after a stop, SIGWINCH when the terminal is resized).
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
    signal.SIGWINCH,
)
EXIT_LOST = 1
EXIT_USAGE = 2  # producer/cli_common.py's, which this module may not import (its libraries)


def main() -> None:
    try:
        code = handed_over(sys.argv)
    except resident.BadSwitch as exc:
        print(f"drover: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if code is None:
        from cli.deferred_imports import defer_all

        defer_all()
        from cli.main import main as run_here

        run_here()
    else:
        sys.exit(code)


def handed_over(argv: list[str]) -> int | None:
    """The exit code of the command run by the server, or None: run it here."""
    mode = resident.switch()
    idle_s = resident.idle_s()  # checked whatever the mode: a typo is said at once
    if mode == resident.OFF or not resident.served(argv[1:]):
        return None
    conn, none_there = _connect()
    if conn is None:
        if mode == resident.AUTO and none_there:
            from cli import autostart

            autostart.start(idle_s)
        return None
    relay = _Relay()  # from here on, a signal is the command's, wherever it runs
    with conn:
        try:
            reader = conn.makefile("rb")
            _send(conn, argv)
            first = _line(reader)
        except (OSError, ValueError):
            first = {}
        pid = _number(first.get("pid"))
        if pid is None or pid <= 0:
            relay.give_back()  # declined (not served, a stale server): it runs here
            return None
        relay.to(pid)
        try:
            last = _line(reader)
        except (OSError, ValueError):
            last = {}
    code = _number(last.get("exit"))
    if code is None:
        print("drover: the command's process ended without an exit status", file=sys.stderr)
        return EXIT_LOST
    return code


class _Relay:
    """Passes the caller's signals on to the served command; one that comes before the
    server has said which process runs it is held, then passed on, or raised here if the
    command is to run here after all. Ctrl-Z (SIGTSTP) stops the command, then the caller;
    the shell's `fg` or `bg` (SIGCONT) resumes both."""

    def __init__(self) -> None:
        self.pid = 0
        self.held: list[int] = []
        self.before = {signum: signal.signal(signum, self._on) for signum in FORWARDED}
        self.before[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, self._on)

    def _on(self, signum: int, _: FrameType | None) -> None:
        if not self.pid:
            self.held.append(signum)
            return
        if signum == signal.SIGTSTP:
            self._kill(signal.SIGSTOP)
            os.kill(os.getpid(), signal.SIGSTOP)  # here until SIGCONT
            signum = signal.SIGCONT
        self._kill(signum)

    def _kill(self, signum: int) -> None:
        try:  # noqa: SIM105 - contextlib is one more import for every command
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass  # it has just ended; its exit code is on its way

    def to(self, pid: int) -> None:
        self.pid = pid
        for signum in self.held:
            self._on(signum, None)

    def give_back(self) -> None:
        for signum, handler in self.before.items():
            signal.signal(signum, handler)
        for held in self.held:
            signal.raise_signal(held)


def _connect() -> tuple[socket.socket | None, bool]:
    """A connection to this user's server, or None and whether no server is there at all (no
    socket, or one left by a server that has gone): then one may be started. A server that
    is another user's, or a directory that is not private, is not used and not replaced."""
    path = resident.socket_path()
    streams_open = all(_open(fd) for fd in resident.STDIO)
    directory = os.path.dirname(path)
    if not streams_open:
        return None, False
    if not os.path.lexists(directory):
        return None, True
    if not resident.private_dir(directory):
        return None, False
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        if resident.peer_uid(conn) == os.getuid():
            return conn, False
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None, True
    except OSError:
        pass
    conn.close()
    return None, False


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _send(conn: socket.socket, argv: list[str]) -> None:
    umask = os.umask(0)
    os.umask(umask)
    request = {
        "argv": argv,
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "umask": umask,
        "install": resident.INSTALL,
    }
    data = json.dumps(request).encode() + b"\n"
    sent = socket.send_fds(conn, [data], list(resident.STDIO))
    if sent < len(data):
        conn.sendall(data[sent:])


def _number(value: object) -> int | None:
    """`value` if it is a JSON integer (not a boolean), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _line(reader: Any) -> dict[str, Any]:
    """One line of the server's; {} when the connection closed first."""
    raw = reader.readline(resident.MAX_REQUEST)
    if not raw:
        return {}
    value = json.loads(raw)
    return value if isinstance(value, dict) else {}
