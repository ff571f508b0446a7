"""What every `drover` command shares: the consoles, exit codes, one-line refusals.

Command modules (producer/cli*.py, cli/) import this one and never each other; the `drover`
app itself is assembled at the top layer (cli/main.py).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar, cast

import redis
import typer
from rich.console import Console

from config.settings import ConfigError
from jobs.record import JobNotFound
from producer.text import plain

# Typer vendors Click; its usage errors all derive from this class (BadParameter included).
# (typed as BadParameter, whose `ctx` and `format_message` it shares).
UsageError = cast("type[typer.BadParameter]", typer.BadParameter.__mro__[1])

# Wide enough for event lines and tables when piped to a log (a terminal sets its own width).
PIPE_WIDTH = 160
out = Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else PIPE_WIDTH)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
T = TypeVar("T")


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """One line on stderr and exit: control characters stripped, as a message may quote
    Redis content (a maintenance reason, a job's reason) or echo the command line."""
    err.print(f"drover: {plain(message)}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn: Callable[[], T]) -> T:
    """Run `fn`, turning every expected error into one line and an exit code."""
    from jobs.errors import BrokerUnavailable, SubmitError
    from producer.outage import RedisOutage

    try:
        return fn()
    except (ConfigError, SubmitError) as exc:
        fail(str(exc), EXIT_USAGE)
    except JobNotFound as exc:
        fail(str(exc.args[0]), EXIT_USAGE)
    except BrokerUnavailable as exc:
        fail(str(exc))
    except TimeoutError as exc:  # --timeout ran out: the job goes on without us
        fail(f"{exc}; it goes on (drover events ID --follow)")
    except RedisOutage as exc:  # already one line that names Redis
        fail(str(exc))
    except redis.AuthenticationError:
        fail("Redis refused the password in the config (redis_url)")
    except redis.RedisError as exc:
        fail(f"Redis: {exc}")


def notice(message: str) -> None:
    """One line on stderr that does not end the command (a Redis outage met while following)."""
    err.print(f"drover: {plain(message)}", markup=False, soft_wrap=True)


def drover() -> Any:
    """The Python API (producer/api.py), imported only by commands that talk to Redis."""
    from producer.api import Drover

    return Drover(notice=notice)


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
