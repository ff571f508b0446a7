"""Start this user's `drover cli-server` in the background when a served command finds none.

Why: the server only helps a caller once it is up (cli/resident.py says what it saves), and
people and scripts that call drover in a loop rarely think of starting one. With
DROVER_CLI_SERVER=auto (the default), the first served command that finds no server starts
one and runs itself as it always has; the ones after it are served. As with Gradle's or
Bazel's daemons, the server stops by itself once it has had no command line for
DROVER_CLI_SERVER_IDLE seconds (15 minutes unless set), and whenever what it loaded changed
on disk; the next command starts a fresh one. `manual` only uses a server started by hand,
`off` none at all.

The server is started without the caller's DROVER_* and CELERY_* variables, as its own
session (no terminal's hang-up or Ctrl-C reaches it), with /dev/null for its standard
streams, so it holds none of the caller's pipes open: a script reading drover's output sees
its end when drover ends. It writes its log to cli-XXXXXXXX.log beside its socket. Several
commands at once may each start one; the server's lock (cli/server_start.py) keeps the first
and the others end at once.

Imported by `drover` before any library (cli/launch.py): the standard library's `os` only.
"""

from __future__ import annotations

import os
import sys

from cli import resident

_NOT_KEPT = ("DROVER_", "CELERY_")


def start(idle_s: float) -> None:
    """Start a server for this user and installation in the background; never waits for it,
    and a server that cannot be started (no directory of the user's own, no process) is no
    error: the command runs where it was typed, as it would without one."""
    directory = resident.socket_dir()
    try:
        os.makedirs(directory, mode=resident.DIR_MODE, exist_ok=True)
    except OSError:
        return
    if not resident.private_dir(directory):
        return  # the server would refuse it too; `drover cli-server` says why
    argv = [
        sys.executable,
        "-P",  # the caller's directory is not on the server's module path
        "-m",
        "cli.server",
        "--idle",
        repr(idle_s),
        "--log",
        resident.log_path(),
    ]
    quiet = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    try:  # noqa: SIM105 - contextlib is one more import for every command
        os.posix_spawn(sys.executable, argv, _server_env(), file_actions=quiet, setsid=True)
    except OSError:
        pass


def _server_env() -> dict[str, str]:
    """The caller's environment without drover's and Celery's settings: the server reads
    none of them (each command runs with its own caller's), and a Redis URL with its
    password, or a key's path, has no business living on in a process for 15 minutes."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_NOT_KEPT)}
