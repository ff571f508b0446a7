"""How a `drover cli-server` starts: its options, its directory, its lock and its log.

One server per user and installation: the server holds an exclusive lock on
cli-XXXXXXXX.lock beside its socket from before it loads anything until it ends. A second
server (started by hand, or by two commands that each found none, cli/autostart.py) ends at
once in one line, and only the lock's holder ever removes a socket left behind and binds its
own: two servers starting together can no longer take the socket from each other.

A server `drover` starts itself is given `--idle SECONDS` (it stops after that long without a
command line) and `--log PATH` (its log, begun afresh by the server that holds the lock).
`drover cli-server`, typed by hand, passes neither: it logs on its stderr and runs until it
is stopped.
"""

from __future__ import annotations

import argparse
import fcntl
import os
from dataclasses import dataclass

from cli import resident

LOG_MODE = 0o600


class ServerError(Exception):
    """The server cannot start; the message says why in one line."""


@dataclass(frozen=True)
class Options:
    idle_s: float | None  # None: until stopped
    log: str | None  # None: its stderr


def options(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="drover cli-server", add_help=False)
    parser.add_argument("--idle", type=float, default=None)
    parser.add_argument("--log", default=None)
    parsed = parser.parse_args(argv)
    idle = parsed.idle
    if idle is not None and not 0 < idle <= resident.IDLE_MAX_S:
        parser.error(f"--idle must be above 0 and at most {resident.IDLE_MAX_S:.0f}")
    return Options(idle, parsed.log)


def private_directory(directory: str) -> None:
    """Make the socket's directory if need be; it must be the user's own, mode 0700."""
    try:
        os.makedirs(directory, mode=resident.DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise ServerError(f"cannot make {directory}: {exc.strerror}") from None
    if not resident.private_dir(directory):
        raise ServerError(f"{directory} must be a directory of this user's, mode 0700")


def log_to(path: str) -> int:
    """Send this process's stdout and stderr to the log at `path` (appended to until the
    lock is held, cli/server.py's begin_log); the log's descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, LOG_MODE)
    for target in (1, 2):
        os.dup2(fd, target)
    return fd


def hold_lock(path: str) -> int:
    """Take the installation's server lock, or say that another server holds it. The
    descriptor is this process's alone: every child of the server closes it (a command that
    runs on after the server ended must not keep the next one from starting)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, LOG_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServerError(
            f"a drover cli-server already runs for {resident.socket_path()}"
        ) from None
    return fd
