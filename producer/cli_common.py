"""What every `drover` command shares: the consoles, exit codes, one-line refusals.

Command modules (producer/cli*.py, cli/) import this one and never each other; the `drover`
app itself is assembled at the top layer (cli/main.py).

Every `drover` command imports this module, `drover --help` included, so it imports nothing
heavy at module level: Redis, the settings' models and Rich's console are loaded by the code
that uses them (a `drover jobs --json` never builds a console).
"""

from __future__ import annotations

import gc
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import typer

from producer.text import escaped

if TYPE_CHECKING:
    from rich.console import Console

# Typer vendors Click; its usage errors all derive from this class (BadParameter included).
# (typed as BadParameter, whose `ctx` and `format_message` it shares).
UsageError = cast("type[typer.BadParameter]", typer.BadParameter.__mro__[1])

# Wide enough for event lines and tables when piped to a log (a terminal sets its own width).
PIPE_WIDTH = 160


class LazyConsole:
    """A Rich console made on first use: importing Rich's console costs about 20 ms, which a
    command printing only JSON (or one line on stderr through `fail`) need not pay."""

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr

    @cached_property
    def console(self) -> Console:
        """The console itself, for code that takes one (a progress display, the demo)."""
        from rich.console import Console

        stream = sys.stderr if self._stderr else sys.stdout
        width = None if stream.isatty() else PIPE_WIDTH
        return Console(stderr=self._stderr, highlight=False, width=width)

    def print(self, *objects: Any, **options: Any) -> None:
        self.console.print(*objects, **options)

    def print_json(self, text: str) -> None:
        self.console.print_json(text)

    @property
    def file(self) -> IO[str]:
        return self.console.file


out = LazyConsole()
err = LazyConsole(stderr=True)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
T = TypeVar("T")


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """One line on stderr and exit: control characters escaped (`\\n`, `\\x1b`), as a message
    may quote Redis content (a maintenance reason, a job's reason), a path or a config key, or
    echo the command line: inert, and still naming exactly what it names."""
    err.print(f"drover: {escaped(message)}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn: Callable[[], T]) -> T:
    """Run `fn`, turning every expected error into one line and an exit code."""
    import redis

    from config.settings import ConfigError
    from jobs.errors import BrokerUnavailable, ControlUnanswered, SubmitError
    from jobs.record import JobNotFound
    from producer.outage import RedisOutage

    try:
        return fn()
    except (ConfigError, SubmitError) as exc:
        fail(str(exc), EXIT_USAGE)
    except JobNotFound as exc:
        fail(str(exc.args[0]), EXIT_USAGE)
    except BrokerUnavailable as exc:
        fail(str(exc))
    except ControlUnanswered as exc:  # says itself what may still happen
        fail(str(exc))
    except TimeoutError as exc:  # --timeout ran out: the job goes on without us
        fail(f"{exc}; it goes on (drover events ID --follow)")
    except RedisOutage as exc:  # already one line that names Redis
        fail(str(exc))
    except redis.AuthenticationError:
        fail("Redis refused the password in the config (redis_url)")
    except redis.RedisError as exc:
        fail(f"Redis: {exc}")


@contextmanager
def goes_on(
    kind: str | set[str], record_id: str, *, as_json: bool = False, when: bool = True
) -> Iterator[None]:
    """Ctrl-C while following `record_id` (`--wait`, `--follow`): the job or evacuation goes
    on without us. The command says so in one stderr line, with how to follow it again and
    how to stop it, and exits 130 as an interrupted command does (it used to print a blank
    line only). `kind` names it ("job", "evacuation") or holds the first words of its events'
    names so far (kind_of). With `as_json`, stdout first gets what the command prints when
    not told to wait, `{"job_id": ID}`, marked `"interrupted": true`: its only line, so the
    output stays one JSON object per line and a script learns which job goes on. Not `when`:
    as if absent."""
    try:
        yield
    except KeyboardInterrupt:
        if not when:
            raise
        if as_json:
            print_json({"job_id": record_id, "interrupted": True})
            sys.stdout.flush()
        what = kind if isinstance(kind, str) else kind_of(kind)
        fail(
            f"interrupted: {what} {record_id} goes on (follow it: drover events {record_id} "
            f"--follow; stop it: drover abort {record_id})",
            EXIT_INTERRUPTED,
        )


@contextmanager
def queued_unsaid(job_id: str) -> Iterator[None]:
    """Printing the id of a job just queued: if it cannot be written (a full disk,
    /dev/full), the job exists all the same, and stderr names it in one line (a probe's
    `drover migrate ... >/dev/full` printed a traceback, and the job it queued was named
    nowhere)."""
    try:
        yield
        sys.stdout.flush()
    except OSError as exc:
        fail(
            f"job {job_id} was queued, but its id could not be written ({exc.strerror}): "
            f"follow it with drover events {job_id}; stop it with drover abort {job_id}"
        )


def follow_job(d: Any, job_id: str, timeout: float | None, as_json: bool) -> Any:
    """`drover migrate --wait`: the job once it has ended, its events printed as they come
    (unless `as_json`); Ctrl-C says it goes on (goes_on)."""
    with goes_on("job", job_id, as_json=as_json):
        if as_json:
            return d.wait(job_id, timeout)
        from producer.follow import follow

        out.print(f"job {job_id}")
        return follow(d, job_id, out.console, timeout)


def kind_of(seen: set[str]) -> str:
    """What a record is, from the first words of its events' names (`evacuation.state`)."""
    if "evacuation" in seen:
        return "evacuation"
    return "job" if seen else "job or evacuation"


def notice(message: str) -> None:
    """One line on stderr that does not end the command (a Redis outage met while following)."""
    err.print(f"drover: {escaped(message)}", markup=False, soft_wrap=True)


def drover() -> Any:
    """The Python API (producer/api.py), imported only by commands that talk to Redis."""
    from producer.api import Drover

    d = Drover(notice=notice)
    start_up_over()  # what follows may wait for hours (--wait, --follow)
    return d


def start_up_over() -> None:
    """Collect garbage again from here on, if `drover`'s start-up stopped it (cli/main.py).

    Start-up (imports, Typer's commands, the settings, the Celery app) makes objects that live
    until exit, so a collection finds nothing to free while it runs, yet each one walks them
    all: about 20 ms of a `drover jobs --json` and 45 ms of a `drover migrate --json`. Those
    objects are frozen first (gc.freeze: never walked again), then collection is back on for
    whatever the command does next, however long it runs. A no-op where collection is on:
    in a test, or anything else that imports this module without going through main().
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def check_timeout(timeout: float | None, wait: bool) -> None:
    """--timeout bounds --wait: alone, or not above zero, it would be silently meaningless.

    Click reads `nan`, `inf` and `1e400` (inf) as floats: nan compares false with everything,
    so it would pass `<= 0` and never expire, and inf is no bound either.
    """
    if timeout is None:
        return
    if not wait:
        fail("--timeout applies only with --wait", EXIT_USAGE)
    if not math.isfinite(timeout):
        fail(f"--timeout must be a finite number of seconds, not {timeout:g}", EXIT_USAGE)
    if timeout <= 0:
        fail(f"--timeout must be above 0 seconds, not {timeout:g}", EXIT_USAGE)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=str) + "\n")
