"""The `drover` command line: migrate, follow, list; run a worker; manage the local lab.

Every refusal is one line on stderr and a non-zero exit; `--json` gives scripts stable output.
"""

from __future__ import annotations

import errno
import gc
import os
import sys
from typing import Annotated

import typer

from cli import help_render
from cli.outline import outlined
from cli.repeated import repeated_option
from cli.resident import HELP_OPTION, command_named
from producer import cli
from producer.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    err,
    fail,
    out,
    start_up_over,
)
from producer.text import escaped


def root(
    ctx: typer.Context,
    config: Annotated[str | None, typer.Option("--config", help="drover.toml to use")] = None,
) -> None:
    """drover: move running VMs between libvirt/KVM hosts."""
    # Before the command reads its options: one given twice is refused (cli/repeated.py).
    problem = repeated_option(ctx.command, sys.argv[1:])
    if problem is not None:
        raise UsageError(problem)
    if config == "":  # skipped, another config file would be used: refused instead
        fail("--config: the path is empty", EXIT_USAGE)
    if config is not None:
        from config.settings import CONFIG_ENV

        os.environ[CONFIG_ENV] = config


def worker(
    host: Annotated[str, typer.Option("--host", help="this hypervisor's registry name")],
    loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO",
) -> None:
    """Run the Celery worker of one hypervisor host (consumes drover.host.HOST)."""
    from cli.lab import lab_guarded
    from worker.main import BadLoglevel, WorkerStartError, check_loglevel, run_worker

    try:  # up front, as `drover beat` does: Celery would refuse it after libvirt's connection
        check_loglevel(loglevel)
    except BadLoglevel as exc:
        fail(str(exc), EXIT_USAGE)

    def go() -> None:
        try:
            run_worker(host, loglevel=loglevel)
        except WorkerStartError as exc:
            fail(str(exc))

    lab_guarded(go)


def demo(
    keep: Annotated[bool, typer.Option("--keep", help="leave the lab up afterwards")] = False,
) -> None:
    """Bring up the local lab, migrate real VMs with live events, verify, tear down."""
    from cli.lab import lab_guarded
    from lab.demo import run_demo

    def go() -> None:
        if not run_demo(out.console, keep=keep):
            fail("demo: a migration did not end where libvirt should show it")

    lab_guarded(go)


def cli_server() -> None:
    """Keep drover's libraries loaded for this user's job commands (`drover migrate`, `jobs`,
    `job`, `events`...): each then starts in a fraction of the time. Runs until stopped."""
    # A fresh interpreter: the server loads only what reads nothing at import (cli/server.py
    # says why), not what this process loaded; -P: the directory it is started from is not
    # on its module path.
    os.execv(sys.executable, [sys.executable, "-P", "-m", "cli.server"])


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
    app.callback()(root)
    return app


def full_app() -> typer.Typer:
    """Every command, in the order `drover --help` lists them."""
    from cli.lab import lab_app
    from producer import (
        cli_control,
        cli_evacuate,
        cli_exporter,
        cli_flower,
        cli_policies,
        cli_redis_acl,
        cli_schedule,
    )

    app = _app()
    app.add_typer(lab_app, name="lab")
    cli.register(app)
    cli_policies.register(app)
    cli_control.register(app)
    app.command()(worker)
    app.command()(demo)
    app.command()(cli_server)
    cli_evacuate.register(app)
    cli_flower.register(app)
    cli_redis_acl.register(app)
    cli_schedule.register(app)
    cli_exporter.register(app)
    return app


def job_app() -> typer.Typer:
    """The job commands alone (producer/cli.py: migrate, jobs, job, events, ...).

    Typer reads every command's signature each time it runs: a `drover jobs` that should
    answer at once would pay for the lab's, the schedules' and Flower's commands too (their
    imports and about 15 ms of Click). Their help, options and errors are the same here.
    """
    app = _app()
    cli.register(app)
    return app


def __getattr__(name: str) -> typer.Typer:
    """`cli.main.app`: the whole `drover` app (tests walk its commands)."""
    if name == "app":
        return full_app()
    raise AttributeError(name)


# What writing to a stdout that takes no more raises (a probe's `>/dev/full` printed a
# traceback); any other OSError is the command's own and is not turned into this line.
UNWRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def standard_streams() -> int | None:
    """None when the command may run: a closed stdin or stderr becomes /dev/null (the exit
    code still says how it ended; a closed stderr made a refusal exit 1 instead of 2). A
    closed stdout is refused before anything is done (EXIT_FAILED): the command could not say
    what it did, and printing its result ended in a traceback."""
    if sys.stdout is None:
        if sys.stderr is not None:
            print("drover: standard output is closed: nothing done", file=sys.stderr)
        return EXIT_FAILED
    for fd, name, mode in ((0, "stdin", "r"), (2, "stderr", "w")):
        if getattr(sys, name) is None:
            null = os.open(os.devnull, os.O_RDWR)  # takes the lowest free descriptor: `fd`
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - for the process
    return None


def written(code: object) -> object:
    """`code`, once what the command printed is written out; EXIT_FAILED and one line when it
    cannot be (a full disk, /dev/full): the interpreter's own flush at exit printed a
    traceback-like "Exception ignored" and exited 120."""
    try:
        sys.stdout.flush()
    except OSError as exc:
        return _unwritable(exc)
    return code


def _unwritable(exc: OSError) -> int:
    print(f"drover: cannot write the output: {exc.strerror}", file=sys.stderr)
    return EXIT_FAILED


def main() -> None:
    """Run the CLI; usage errors become one line (Click's boxed help is for --help)."""
    # No garbage collection until the start-up is over (producer/cli_common.py says why): a
    # job command turns it back on once its API is built, every other command before it runs.
    gc.disable()
    closed = standard_streams()
    if closed is not None:
        sys.exit(closed)
    args = sys.argv[1:]
    quick = command_named(args) in cli.COMMAND_NAMES
    if HELP_OPTION in args or not args:  # `drover` alone shows the help too
        help_render.load()
    try:
        command = outlined(job_app() if quick else full_app(), args)
        if not quick:  # a worker, Flower, the exporter, the lab...: long-running, most of them
            start_up_over()
        code = command(standalone_mode=False)
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            pass  # building this error rendered the help already (Typer's rich help prints)
        else:
            where = exc.ctx.command_path if exc.ctx else "drover"
            # One line whatever Click echoes of the command line (it escapes what it quotes
            # today; a newline in a message would make two lines).
            err.print(escaped(f"{where}: {exc.format_message()}"), markup=False, soft_wrap=True)
        code = EXIT_USAGE
    except typer.Abort:
        code = EXIT_INTERRUPTED
    except OSError as exc:  # stdout that takes no more (a full disk, /dev/full): one line
        if exc.errno not in UNWRITABLE:
            raise
        code = _unwritable(exc)
    code = written(code)
    # Python's last garbage collection at exit walks every object the imports made (pydantic's
    # schemas, Click's commands): about 50 ms of a `drover jobs` that should answer at once.
    # Frozen objects are skipped; atexit handlers and finalizers still run. Collection is on
    # again for whatever runs after main() in this interpreter (a test calling it in process).
    start_up_over()
    gc.freeze()
    sys.exit(code if isinstance(code, int) else 0)
