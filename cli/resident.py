"""Where a resident `drover cli-server` listens, and what its client and it say to each other.

Why a resident process: a `drover` command spends most of its start-up importing its
libraries (Typer, pydantic, redis-py; Celery, kombu and the signing for a migrate), about
180 ms for `drover jobs` and 290 ms for `drover migrate` on the lab machine, before any of
drover's own code runs (bench/cli_startup.py). A shell or a script that calls drover in a loop
pays that every time. `drover cli-server` imports those libraries once; each command line
handed to it runs in a fresh child forked from it, with the caller's arguments, environment,
working directory, umask and standard streams. drover's own job-command modules that read
nothing as they are imported are loaded once too; the rest are imported in that child from
disk, and a child finding any loaded file changed since declines (cli/server.py), so nothing
goes stale. Without a server, `drover` runs the command itself, as before: the server only
ever makes a command faster.

This module is imported by every `drover` command (cli/launch.py), so it imports only small
parts of the standard library (no typing, no pathlib): a served command's whole run is about
90 ms, and those two would be 6 of them.

The socket's directory is the caller's own: `$XDG_RUNTIME_DIR/drover`, else
`/tmp/drover-UID`, mode 0700 and owned by the user; the socket's name carries a digest of the
installation, so two installations (two virtualenvs) never hand each other a command line.
A directory that is anyone else's, or open to others, is not used by either side.

The exchange, one JSON object per line on one connection:
    client -> server   {"argv", "env", "cwd", "umask", "install"} with fds 0, 1, 2 attached
    server -> client   {"pid": N} (it runs the command) or {"declined": REASON}
    server -> client   {"exit": CODE} once the command has ended
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import sys
import zlib

# `DROVER_CLI_SERVER`: `auto` (the default) hands a served command to this user's server and
# starts one in the background when none answers; `manual` uses one that is up and never
# starts one; `off` runs every command in this process even if a server is up.
SWITCH_ENV = "DROVER_CLI_SERVER"
AUTO = "auto"
MANUAL = "manual"
OFF = "off"
SWITCHES = (AUTO, MANUAL, OFF)
# `DROVER_CLI_SERVER_IDLE`: seconds a server started by `drover` itself waits for a command
# line before it stops (one started with `drover cli-server` runs until it is stopped).
IDLE_ENV = "DROVER_CLI_SERVER_IDLE"
IDLE_DEFAULT_S = 900.0
IDLE_MIN_S = 1.0
IDLE_MAX_S = 86_400.0

# What the server's interpreter and the libraries it loads read from the environment as they
# start, before any caller's environment is in place: the module path (PYTHONPATH, and a
# sitecustomize on it), the user's site-packages (HOME), the streams' encoding (LANG, LC_*,
# PYTHONIOENCODING), the three variables Typer reads as it is imported. A caller whose values
# differ is served by a server of its own, started with its values: they are in the digest
# that names the socket, and a child checks them again (cli/server.py).
STARTUP_PREFIXES = ("PYTHON", "LC_")
STARTUP_NAMES = frozenset(
    {
        "HOME",
        "LANG",
        "LANGUAGE",
        "TYPER_USE_RICH",
        "TERMINAL_WIDTH",
        "_TYPER_FORCE_DISABLE_TERMINAL",
    }
)
RUNTIME_ENV = "XDG_RUNTIME_DIR"
# What else a server `drover` starts keeps of its caller's environment: where programs are and
# its runtime directory. A caller's secrets (a Redis URL with its password, a token) never live
# on in it; each command runs with its own caller's environment.
KEPT_NAMES = frozenset({"PATH", "TMPDIR", RUNTIME_ENV})
DIR_MODE = 0o700
SOCKET_MODE = 0o600
# What a request may weigh: arguments and a whole environment fit with room to spare.
MAX_REQUEST = 1 << 20
STDIO = (0, 1, 2)
# struct ucred { pid_t pid; uid_t uid; gid_t gid; }: what SO_PEERCRED answers.
_UCRED = struct.Struct("3i")

# What the server runs: the job commands (producer/cli.py's COMMAND_NAMES, which a test holds
# this to) and the root's help. The rest run where they are typed: a worker, the lab, Flower
# and the exporter run for as long as their caller does; the others are seldom typed in loops.
SERVED = frozenset({"migrate", "abort", "postcopy", "events", "jobs", "job"})
CONFIG_OPTION = "--config"
HELP_OPTION = "--help"

# This installation: the directory that holds the `cli` package.
INSTALL = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def command_named(args: list[str]) -> str | None:
    """The command on a `drover` command line (after the root's `--config`), if any."""
    rest = list(args)
    while rest and (rest[0] == CONFIG_OPTION or rest[0].startswith(f"{CONFIG_OPTION}=")):
        rest = rest[1:] if "=" in rest[0] else rest[2:]
    return rest[0] if rest and not rest[0].startswith("-") else None


def served(args: list[str]) -> bool:
    """Whether a server runs this command line (`args`: after the program's name)."""
    command = command_named(args)
    if command is None:
        return not args or HELP_OPTION in args
    return command in SERVED


def socket_dir(env: dict[str, str] | None = None) -> str:
    """Where the server's socket, lock and log are, for `env` (this process's unless given)."""
    runtime = (os.environ if env is None else env).get(RUNTIME_ENV)
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "drover")
    return f"/tmp/drover-{os.getuid()}"


def startup_env(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The variables of `env` that the server reads as it starts (STARTUP_NAMES, ...)."""
    return {k: v for k, v in env.items() if k in STARTUP_NAMES or k.startswith(STARTUP_PREFIXES)}


def _stem(env: dict[str, str] | None) -> str:
    """This installation's files in the socket's directory are named after it, its
    interpreter and the start-up variables of `env` (this process's environment if None)."""
    startup = sorted(f"{k}={v}" for k, v in startup_env(os.environ if env is None else env).items())
    key = "\0".join([INSTALL, sys.executable, *startup])
    digest = zlib.crc32(key.encode("utf-8", "surrogateescape")) & 0xFFFFFFFF
    return os.path.join(socket_dir(env), f"cli-{digest:08x}")


def socket_path(env: dict[str, str] | None = None) -> str:
    """The socket of this installation's server for this user and `env`'s start-up variables
    (this process's environment unless given)."""
    return f"{_stem(env)}.sock"


def lock_path(env: dict[str, str] | None = None) -> str:
    """Held by this installation's server for as long as it runs: one server at a time."""
    return f"{_stem(env)}.lock"


def log_path(env: dict[str, str] | None = None) -> str:
    """The log of a server `drover` started itself (one started by hand logs on its stderr)."""
    return f"{_stem(env)}.log"


class BadSwitch(ValueError):
    """DROVER_CLI_SERVER or DROVER_CLI_SERVER_IDLE holds what drover cannot use."""


def switch() -> str:
    """DROVER_CLI_SERVER, checked: one of SWITCHES (unset or empty: auto)."""
    value = os.environ.get(SWITCH_ENV, "").strip().lower() or AUTO
    if value not in SWITCHES:
        raise BadSwitch(
            f"{SWITCH_ENV} must be {', '.join(SWITCHES[:-1])} or {SWITCHES[-1]}, "
            f"not {os.environ[SWITCH_ENV]!r}"
        )
    return value


def idle_s() -> float:
    """DROVER_CLI_SERVER_IDLE, checked: seconds (digits, a decimal part allowed), at least
    one, at most a day."""
    raw = os.environ.get(IDLE_ENV, "").strip()
    if not raw:
        return IDLE_DEFAULT_S
    whole, _, part = raw.partition(".")
    digits = raw.isascii() and whole.isdigit() and (not part or part.isdigit())
    value = float(raw) if digits else -1.0
    if not IDLE_MIN_S <= value <= IDLE_MAX_S:
        raise BadSwitch(
            f"{IDLE_ENV} must be a number of seconds from {IDLE_MIN_S:.0f} to "
            f"{IDLE_MAX_S:.0f}, not {raw!r}"
        )
    return value


def private_dir(path: str) -> bool:
    """`path` is a real directory (not a link), owned by this user, closed to everyone else."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.getuid()
        and stat.S_IMODE(st.st_mode) & 0o077 == 0
    )


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket, as the kernel says."""
    _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)
