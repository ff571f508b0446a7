"""Start this user's `drover cli-server` in the background when a served command finds none.

Why: the server only helps a caller once it is up (cli/resident.py says what it saves), and
people and scripts that call drover in a loop rarely think of starting one. With
DROVER_CLI_SERVER=auto (the default), the first served command that finds no server starts
one and runs itself as it always has; the ones after it are served. As with Gradle's or
Bazel's daemons, the server stops by itself once it has had no command line for
DROVER_CLI_SERVER_IDLE seconds (15 minutes unless set), and whenever what it loaded changed
on disk; the next command starts a fresh one. `manual` only uses a server started by hand,
`off` none at all.

What the server takes of its first caller, and what it does not:
- of the environment, only what its interpreter and libraries read as they start
  (resident.STARTUP_NAMES: the module path, the encoding...), which also names its socket, so
  that a caller with other values has a server of its own, and resident.KEPT_NAMES; a Redis
  URL with its password or any other secret of the caller's never lives on in it;
- no file descriptor but /dev/null on its standard streams: a pipe a script reads, or a lock
  a cron job holds with flock(1), is never kept open by it;
- not its working directory (`/`, then its own directory: cli/server_start.py), nor its
  session: no terminal's hang-up or Ctrl-C reaches it.
It writes its log to cli-XXXXXXXX.log beside its socket. Several commands at once may each
start one; the server's lock (cli/server_start.py) keeps the first and the others end at once.
"""

from __future__ import annotations

import os
import sys

from cli import resident


def start(idle_s: float) -> None:
    """Start a server for this user and installation in the background; never waits for it,
    and a server that cannot be started (no directory of the user's own, no process) is no
    error: the command runs where it was typed, as it would without one."""
    import contextlib  # here only: once per server started, not in every command
    import subprocess

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
    ]
    with contextlib.suppress(OSError):
        subprocess.Popen(
            argv,
            env=server_env(),
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
        )


def server_env() -> dict[str, str]:
    """What a server started here keeps of this process's environment."""
    kept = {k: v for k, v in os.environ.items() if k in resident.KEPT_NAMES}
    return kept | resident.startup_env(os.environ)
