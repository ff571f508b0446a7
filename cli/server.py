"""`drover cli-server`: a resident process that runs `drover` command lines for its user, each
in a child forked from it with the libraries already imported (cli/resident.py says why).

What it serves: the job commands (migrate, jobs, job, events, abort, postcopy), the ones a
script calls in a loop, and the root's help (cli/resident.py's SERVED). Anything else (a
worker, the lab, Flower...) it declines, and the caller runs it itself.

What it keeps, and why nothing goes stale:
- Before any fork it imports the third-party libraries the job commands use (PRELOAD), and
  those of drover's own modules that read nothing when imported (DROVER_PRELOAD): no
  environment variable and no file, so that what they hold is the same whoever calls. The
  rest (config.celery, whose Celery app reads CELERY_* variables as it is made, and what
  imports it) is imported by each child from disk, with the caller's environment in place.
- Each child first compares the files of every module loaded (drover's preloaded ones too)
  and the directories that hold installed packages with what they were when the server
  started. If anything was upgraded, installed or edited since, it declines and stops the
  server; the caller runs the command itself.

Each child takes the caller's arguments, environment, working directory, umask and standard
streams, starts a session of its own (so the server's terminal and process group never
reach it, and a terminal it is handed is not its controlling one), and reports the exit code.
If the caller goes away, the child is stopped with SIGHUP, as a terminal's hang-up would.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import io
import json
import os
import signal
import socket
import sys
import threading
import time
import types
from typing import Any, NoReturn

from cli import resident, server_start
from cli.server_start import ServerError

# What `drover migrate`, `jobs`, `job` and `events` import before any drover code runs.
PRELOAD = (
    "typer",
    "typer._adapters",
    "pydantic",
    "redis",
    "rich.console",
    "celery",
    "celery.canvas",
    "celery.security",
    "kombu.transport.redis",
    "cryptography.hazmat.primitives.serialization",
    "cryptography.x509",
)
# The job commands' own modules (these and what they import: options, models, stores,
# admission), built once here instead of in every child: about 70 ms of a served
# `drover migrate`'s start-up, mostly pydantic building its models. Each reads no
# environment variable and no file when imported (tests/unit/test_cli_server.py holds them
# to that); config.celery stays out.
DROVER_PRELOAD = (
    "cli.main",  # and through it producer.cli, its options, the help's renderer
    "producer.hosts",
    "producer.jobs_list",
    "producer.waiting",
    "jobs.submission",
    "jobs.validation",
    "jobs.dry_run",
    "jobs.phases",
)
BACKLOG = 64
LISTENING = "drover cli-server: listening on"  # its first line, once it takes callers
EXIT_DECLINED = 3
# A caller sends its request at once; a connection that does not is dropped after this long.
REQUEST_TIMEOUT_S = 10.0
_server_pid = 0  # set by serve(), read by its children
_lock_fd = -1  # the server's lock (cli/server_start.py), closed by every child
_startup: dict[str, str] = {}  # the server's start-up variables (resident.startup_env)


# --- what the server has loaded, so that a child can tell whether it is still current ------


Stamp = dict[str, tuple[int, int]]


def _watched() -> list[str]:
    """Every file of a loaded module (drover's preloaded ones included: one edited since is
    stale like an upgraded library), and the directories on the module path (a package
    installed or removed changes its directory). The directory drover itself is installed
    in is left out: files come and go there with every build and test run, and a module
    added there is new to every process alike. (The server runs with `python -P`, so the
    directory it was started from is not on its path.)"""
    files = {
        path
        for module in list(sys.modules.values())
        if isinstance(path := getattr(module, "__file__", None), str)
    }
    dirs = {p for p in sys.path if os.path.isdir(p) and os.path.realpath(p) != resident.INSTALL}
    return sorted(files | dirs)


def stamp(paths: list[str]) -> Stamp:
    """Each path's modification time and inode (a package upgraded has new files)."""
    out: Stamp = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out[path] = (0, 0)
        else:
            out[path] = (st.st_mtime_ns, st.st_ino)
    return out


def preload() -> Stamp:
    for name in (*PRELOAD, *DROVER_PRELOAD):
        importlib.import_module(name)
    # pydantic looks for its plugins (importlib.metadata's entry points) on its first schema:
    # done once here, not in every child.
    from pydantic import TypeAdapter

    TypeAdapter(int)
    return stamp(_watched())


# --- the server ------------------------------------------------------------------------------


def serve(path: str, idle_s: float | None = None) -> None:
    """Listen on `path` until stopped (SIGTERM, SIGINT, a child finding the server stale, or
    `idle_s` seconds without a caller). The caller holds the server's lock."""
    global _server_pid, _startup
    _server_pid = os.getpid()
    _startup = resident.startup_env(os.environ)
    loaded = preload()
    name = os.path.basename(path)  # in the working directory (cli/server_start.py)
    listener = _listen(name, path)
    listener.settimeout(idle_s)
    bound = os.stat(name).st_ino
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, _stop)
    gc.freeze()  # what the preload made is shared with every child, untouched
    print(f"{LISTENING} {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    if resident.peer_uid(conn) == os.getuid() and os.fork() == 0:
                        _child(conn, listener, loaded)
                except OSError as exc:  # the caller left, or no process could be made
                    print(f"drover cli-server: a caller not served: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    except TimeoutError:
        print(f"drover cli-server: no command line for {idle_s:g} s; it stops", file=sys.stderr)
    finally:
        _remove(name, bound)
        listener.close()


def _stop(signum: int, _: Any) -> None:
    raise KeyboardInterrupt


def _listen(name: str, path: str) -> socket.socket:
    """Bind `name` (in the working directory; `path` is its whole path, for people)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(name)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)  # a server that is gone left it
    else:
        raise ServerError(f"a drover cli-server already listens on {path}")
    finally:
        probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(name)
    finally:
        os.umask(old)
    listener.listen(BACKLOG)
    return listener


def _remove(path: str, bound: int) -> None:
    """Remove the socket if it is still the one this server bound (`bound`: its inode)."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == bound:
            os.unlink(path)


# --- one command line, in a child ------------------------------------------------------------


def _child(conn: socket.socket, listener: socket.socket, loaded: Stamp) -> NoReturn:
    """Run one command line and exit; never returns into the server's loop. Each writes a
    line to the server's log (its stderr), before its caller hears the outcome: what ran,
    in which process, and how it ended."""
    code = EXIT_DECLINED
    log = os.dup(2)  # the server's stderr, before the caller's takes its place
    said = "ended before its request was read"
    try:
        listener.close()
        os.close(_lock_fd)
        os.setsid()
        atexit._clear()  # the server's are not this command's
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        request = _receive(conn)
        reason = _refusal(request, loaded) or _take_over(request) or _not_served(request)
        if reason is not None:
            said = f"declined: {reason}"
            _log(log, said)
            _say(conn, {"declined": reason})
        else:
            _say(conn, {"pid": os.getpid()})
            threading.Thread(target=_hang_up_when_gone, args=(conn,), daemon=True).start()
            said = f"ran {resident.command_named(request['argv'][1:]) or 'help'}"
            code = _run(request["argv"])
            said += f", exit {code}"
            _log(log, said)
            _say(conn, {"exit": code})
    except BaseException as exc:  # nothing of a child may reach the server's loop
        _log(log, f"{said} ({type(exc).__name__})")
    os._exit(code)


def _log(fd: int, line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"drover cli-server: pid {os.getpid()} {line}\n".encode())


def _receive(conn: socket.socket) -> dict[str, Any]:
    conn.settimeout(REQUEST_TIMEOUT_S)
    data, fds, _, _ = socket.recv_fds(conn, resident.MAX_REQUEST, len(resident.STDIO))
    while not data.endswith(b"\n") and len(data) < resident.MAX_REQUEST:
        more = conn.recv(resident.MAX_REQUEST - len(data))
        if not more:
            break
        data += more
    conn.settimeout(None)
    request = json.loads(data)
    if not isinstance(request, dict):
        raise ValueError("not a request")
    request["fds"] = fds
    return request


def _refusal(request: dict[str, Any], loaded: Stamp) -> str | None:
    """Why this child will not take the request (None: it will)."""
    argv, env = request.get("argv"), request.get("env")
    if len(request["fds"]) != len(resident.STDIO):
        return "the standard streams did not come"
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        return "malformed request"
    if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
        return "malformed request"
    if not isinstance(request.get("cwd"), str) or not isinstance(request.get("umask"), int):
        return "malformed request"
    if request.get("install") != resident.INSTALL:
        return "another installation's command"
    if resident.startup_env(env) != _startup:  # the socket's digest says so, unless it collides
        return "a command whose start-up environment (PYTHONPATH, HOME, LANG...) is another"
    if stamp(list(loaded)) != loaded:
        _stop_server()
        return "the server's libraries changed since it started; it stops"
    return None


def _stop_server() -> None:
    """SIGTERM to the server: this child's parent, as long as it still is (a child whose
    server has gone has been given to another parent, which is none of its business)."""
    if os.getppid() == _server_pid:
        os.kill(_server_pid, signal.SIGTERM)


def _not_served(request: dict[str, Any]) -> str | None:
    if not resident.served(request["argv"][1:]):
        return "not a command the server runs"
    return None


def _take_over(request: dict[str, Any]) -> str | None:
    """Become the caller's process: its directory, environment, umask and streams."""
    try:
        os.chdir(request["cwd"])
    except OSError as exc:
        return f"cannot enter {request['cwd']}: {exc.strerror}"
    os.environ.clear()
    os.environ.update(request["env"])
    os.umask(request["umask"])
    time.tzset()  # the caller's TZ, for anything that shows local time
    for target, fd in zip(resident.STDIO, request["fds"], strict=True):
        os.dup2(fd, target)
        os.close(fd)
    encoding, errors = sys.stdout.encoding, sys.stdout.errors
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding, errors)
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), encoding, errors, line_buffering=os.isatty(1)
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding, "backslashreplace", line_buffering=True
    )
    return None


def _hang_up_when_gone(conn: socket.socket) -> None:
    """The caller sends nothing more: a read that ends means it has gone."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGHUP)


def _run(argv: list[str]) -> int:
    """cli/main.py's main(), as `drover` would run it; its exit code."""
    sys.argv = list(argv)
    # As in the `drover` script: a __main__ of no package (Click names the program from it).
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        from cli.main import main

        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:  # printed as the interpreter would, then its exit code
        sys.excepthook(*sys.exc_info())
        # Ctrl-C before the command took it over (while drover's modules load): the
        # interpreter would die of SIGINT, which a shell shows as 130.
        from producer.cli_common import EXIT_FAILED, EXIT_INTERRUPTED

        code = EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else EXIT_FAILED
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _say(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def main() -> None:
    """`python -m cli.server` (what `drover cli-server` runs, and cli/autostart.py): one line
    and exit 1 on error."""
    global _lock_fd
    chosen = server_start.options(sys.argv[1:])
    path = resident.socket_path()
    try:
        # From here on the directory is the working one: its files are named relative to it.
        server_start.enter_private_directory(os.path.dirname(path))
        log = server_start.log_to(os.path.basename(resident.log_path())) if chosen.log else -1
        _lock_fd = server_start.hold_lock(os.path.basename(resident.lock_path()))
        if log >= 0:
            os.ftruncate(log, 0)  # this server's log; what the one before wrote is over
        serve(path, chosen.idle_s)
    except (ServerError, OSError) as exc:
        print(f"drover cli-server: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
