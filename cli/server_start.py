"""How a `drover cli-server` starts: its options, its directory, its lock and its log.

One server per user and installation: the server holds an exclusive lock on
cli-XXXXXXXX.lock beside its socket from before it loads anything until it ends. A second
server (started by hand, or by two commands that each found none, cli/autostart.py) ends at
once in one line, and only the lock's holder ever removes a socket left behind and binds its
own: two servers starting together can no longer take the socket from each other.

A server `drover` starts itself is given `--idle SECONDS` (it stops after that long without a
command line) and `--log` (it logs to cli-XXXXXXXX.log beside its socket, truncated by the
server that takes the lock). `drover cli-server`, typed by hand, passes neither: it logs on
its stderr and runs until it is stopped.

Its directory is opened once, checked on the open descriptor (the user's own, mode 0700, not
a link) and made the server's working directory; its log, lock and socket are then named
relative to it. A directory checked by its path and then used by its path could be swapped
between the two by whoever owns the one above it (a probe made root write its log into a
directory of another user's, whose XDG_RUNTIME_DIR root ran with). The log and the lock must
be regular files of the user's: a FIFO or a device put there is refused, not waited on.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import stat
from dataclasses import dataclass

from cli import resident

LOG_MODE = 0o600


class ServerError(Exception):
    """The server cannot start; the message says why in one line."""


@dataclass(frozen=True)
class Options:
    idle_s: float | None  # None: until stopped
    log: bool  # False: its stderr


def options(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="drover cli-server", add_help=False)
    parser.add_argument("--idle", type=float, default=None)
    parser.add_argument("--log", action="store_true")
    parsed = parser.parse_args(argv)
    idle = parsed.idle
    if idle is not None and not resident.IDLE_MIN_S <= idle <= resident.IDLE_MAX_S:
        parser.error(f"--idle must be from {resident.IDLE_MIN_S:.0f} to {resident.IDLE_MAX_S:.0f}")
    return Options(idle, parsed.log)


def enter_private_directory(directory: str) -> None:
    """Make the socket's directory if need be, check it on its open descriptor (the user's
    own, mode 0700, not a link), and make it this process's working directory."""
    try:
        os.makedirs(directory, mode=resident.DIR_MODE, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ServerError(f"cannot use {directory}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise ServerError(f"{directory} must be a directory of this user's, mode 0700")
        os.fchdir(fd)
    finally:
        os.close(fd)


def _own_file(name: str, flags: int) -> int:
    """Open (or make) the regular file `name` of this user's in the working directory."""
    fd = os.open(name, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, LOG_MODE)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise ServerError(f"{name} must be a regular file of this user's")
    return fd


def log_to(name: str) -> int:
    """Send this process's stdout and stderr to the log `name` (appended to until the lock is
    held, then truncated: cli/server.py); the log's descriptor."""
    fd = _own_file(name, os.O_WRONLY | os.O_APPEND)
    for target in (1, 2):
        os.dup2(fd, target)
    return fd


def hold_lock(name: str) -> int:
    """Take the installation's server lock `name`, or say that another server holds it. The
    descriptor is this process's alone: every child of the server closes it (a command that
    runs on after the server ended must not keep the next one from starting)."""
    fd = _own_file(name, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServerError(
            f"a drover cli-server already runs for {resident.socket_path()}"
        ) from None
    return fd
