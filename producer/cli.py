"""The `drover` command line: migrate, follow, list; run a worker; manage the local lab.

Every refusal is one line on stderr and a non-zero exit; `--json` gives scripts stable output.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar, cast

import redis
import typer
from rich.console import Console

from config.settings import CONFIG_ENV, ConfigError
from jobs.store import JobNotFound
from producer.text import plain, plain_data

# Typer vendors Click; its usage errors all derive from this class (BadParameter included).
# (typed as BadParameter, whose `ctx` and `format_message` it shares).
UsageError = cast("type[typer.BadParameter]", typer.BadParameter.__mro__[1])

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
lab_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The local lab: real libvirt hosts in namespaces.",
)
app.add_typer(lab_app, name="lab")
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
    from lab.proc import LabError
    from producer.api import BrokerUnavailable, SubmitError
    from producer.outage import RedisOutage

    try:
        return fn()
    except (ConfigError, SubmitError, LabError) as exc:
        fail(str(exc), EXIT_USAGE if isinstance(exc, SubmitError | ConfigError) else EXIT_FAILED)
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


def _drover() -> Any:
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


@app.callback()
def root(
    config: Annotated[str | None, typer.Option("--config", help="drover.toml to use")] = None,
) -> None:
    """drover: move running VMs between libvirt/KVM hosts."""
    if config:
        os.environ[CONFIG_ENV] = config


@app.command()
def migrate(
    domain: Annotated[str, typer.Argument(help="domain name")],
    src: Annotated[str, typer.Option("--from", help="source host (registry name)")],
    dst: Annotated[str, typer.Option("--to", help="destination host (registry name)")],
    live: Annotated[bool, typer.Option("--live", help="migrate while the guest runs")] = False,
    offline: Annotated[
        bool, typer.Option("--offline", help="move only the definition (needs --persistent)")
    ] = False,
    p2p: Annotated[bool, typer.Option("--p2p", help="managed peer-to-peer (default)")] = False,
    direct: Annotated[
        bool, typer.Option("--direct", help="managed direct: the worker drives both libvirtds")
    ] = False,
    unmanaged: Annotated[
        bool, typer.Option("--unmanaged", help="unmanaged direct: the hypervisor migrates")
    ] = False,
    tunnelled: Annotated[
        bool, typer.Option("--tunnelled", help="data through the libvirtd connection (p2p)")
    ] = False,
    dest_connection: Annotated[
        bool,
        typer.Option("--dest-connection", help="p2p through virDomainMigrate2 (worker opens dest)"),
    ] = False,
    tls: Annotated[bool, typer.Option("--tls", help="QEMU native migration TLS")] = False,
    persistent: Annotated[bool, typer.Option("--persistent")] = False,
    undefine_source: Annotated[bool, typer.Option("--undefine-source")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="allow --undefine-source to leave no definition")
    ] = False,
    suspend: Annotated[bool, typer.Option("--suspend", help="leave it paused on arrival")] = False,
    dname: Annotated[str | None, typer.Option("--dname", help="new name on arrival")] = None,
    change_protection: Annotated[bool, typer.Option("--change-protection")] = False,
    abort_on_error: Annotated[bool, typer.Option("--abort-on-error")] = False,
    auto_converge: Annotated[bool, typer.Option("--auto-converge")] = False,
    compressed: Annotated[bool, typer.Option("--compressed")] = False,
    postcopy: Annotated[
        bool, typer.Option("--postcopy", help="allow `drover postcopy JOB` to switch")
    ] = False,
    bandwidth: Annotated[int | None, typer.Option("--bandwidth", help="MiB/s cap")] = None,
    completion_timeout: Annotated[
        int | None,
        typer.Option("--completion-timeout", help="seconds a live migration may take to converge"),
    ] = None,
    timeout_action: Annotated[
        str | None,
        typer.Option("--timeout-action", help="then: suspend (default) | postcopy | abort"),
    ] = None,
    parallel: Annotated[
        int | None, typer.Option("--parallel", help="parallel migration connections")
    ] = None,
    copy_storage: Annotated[
        str | None, typer.Option("--copy-storage", help="all|inc: copy local disks")
    ] = None,
    migrate_uri: Annotated[
        str | None, typer.Option("--migrate-uri", help="tcp://HOST[:PORT] | rdma:// | unix://")
    ] = None,
    listen_address: Annotated[
        str | None, typer.Option("--listen-address", help="destination listen address")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow until the job ends")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", help="with --wait")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Queue a migration of DOMAIN from one host to another (virsh migrate's options)."""
    flows = [
        name for name, on in (("p2p", p2p), ("direct", direct), ("unmanaged", unmanaged)) if on
    ]
    if len(flows) > 1:
        fail(f"choose one control flow, not {' and '.join('--' + f for f in flows)}", EXIT_USAGE)
    request = {
        "domain": domain,
        "src": src,
        "dst": dst,
        "live": live,
        "offline": offline,
        "control": flows[0] if flows else "p2p",
        "transport": "tunnelled" if tunnelled else "native",
        "dest_connection": dest_connection,
        "tls": tls,
        "persistent": persistent,
        "undefine_source": undefine_source,
        "force": force,
        "suspend": suspend,
        "dname": dname,
        "change_protection": change_protection,
        "abort_on_error": abort_on_error,
        "auto_converge": auto_converge,
        "compressed": compressed,
        "postcopy": postcopy,
        "bandwidth_mib": bandwidth,
        "completion_timeout_s": completion_timeout,
        "timeout_action": timeout_action,
        "parallel": parallel,
        "copy_storage": copy_storage,
        "migrate_uri": migrate_uri,
        "listen_address": listen_address,
    }

    check_timeout(timeout, wait)

    def go() -> None:
        d = _drover()
        job_id = d.submit(d.spec(**request))
        if not wait:
            print_json({"job_id": job_id}) if as_json else out.print(job_id)
            return
        job = d.wait(job_id, timeout) if as_json else _follow_with_progress(d, job_id, timeout)
        if as_json:
            phases = {k: v.model_dump(mode="json") for k, v in job.phases.items()}
            print_json(job.summary() | {"phases": phases})
        if job.state.value != "succeeded":
            fail(f"job {job_id} {job.state.value}: {job.reason}")

    guarded(go)


@app.command()
def abort(job_id: Annotated[str, typer.Argument(help="job id")]) -> None:
    """Abort a job: queued ones never start, a running migration is aborted in libvirt."""
    out.print(plain(guarded(lambda: _drover().abort(job_id))), markup=False)


@app.command()
def postcopy(job_id: Annotated[str, typer.Argument(help="a running --postcopy job")]) -> None:
    """Switch a running migration started with --postcopy to post-copy."""
    guarded(lambda: _drover().start_postcopy(job_id))
    out.print(f"post-copy requested for {job_id}")


def _follow_with_progress(d: Any, job_id: str, timeout: float | None) -> Any:
    from producer.follow import follow

    out.print(f"job {job_id}")
    return follow(d, job_id, out, timeout)


@app.command()
def events(
    job_id: Annotated[str, typer.Argument(help="job id")],
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print a job's events (JSON lines with --json); --follow until the job ends."""
    from producer.render import event_line

    def go() -> None:
        for ev in _drover().events(job_id, follow=follow):
            print_json(ev) if as_json else out.print(event_line(ev), markup=False, soft_wrap=True)
            sys.stdout.flush()

    guarded(go)


@app.command()
def jobs(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 50,
) -> None:
    """List recent jobs with state, domain, hosts and duration."""
    from producer.render import jobs_table

    def go() -> None:
        found = _drover().jobs(limit)
        print_json([j.summary() for j in found]) if as_json else out.print(jobs_table(found))

    guarded(go)


@app.command()
def job(
    job_id: Annotated[str, typer.Argument(help="job id")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one job (phases, hosts, timings, result) or evacuation (plan, children, outcome)."""

    def go() -> None:
        j = _drover().record(job_id)
        data = j.model_dump(mode="json")
        if as_json:
            print_json(data)  # json.dumps escapes every control and non-ASCII character
        else:  # Rich re-dumps it without ensure_ascii: DEL, C1 and bidi controls would pass
            out.print_json(json.dumps(plain_data(data), default=str))

    guarded(go)


@app.command()
def worker(
    host: Annotated[str, typer.Option("--host", help="this hypervisor's registry name")],
    loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO",
) -> None:
    """Run the Celery worker of one hypervisor host (consumes drover.host.HOST)."""
    from worker.main import WorkerStartError, run_worker

    def go() -> None:
        try:
            run_worker(host, loglevel=loglevel)
        except WorkerStartError as exc:
            fail(str(exc))

    guarded(go)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option("--keep", help="leave the lab up afterwards")] = False,
) -> None:
    """Bring up the local lab, migrate real VMs with live events, verify, tear down."""
    from producer.demo import run_demo

    def go() -> None:
        if not run_demo(out, keep=keep):
            fail("demo: a migration did not end where libvirt should show it")

    guarded(go)


@lab_app.command("up")
def lab_up(
    hosts: Annotated[int, typer.Option("--hosts", help="number of hosts (2-8)")] = 2,
    guests: Annotated[
        int, typer.Option("--guests", help="idle guests idle-1..idle-N on lab1 (and dirty-1)")
    ] = 1,
    tls: Annotated[
        bool, typer.Option("--tls", help="a CA and host certificates; libvirtd on qemu+tls")
    ] = False,
) -> None:
    """Create lab1..labN: namespaces, libvirtd, workers, Redis; guests on lab1."""
    from lab import control

    def go() -> None:
        state = control.up(hosts, tls=tls, guests=guests)
        out.print(f"lab up: {', '.join(state.hosts)}; config {state.config}")
        out.print('run: eval "$(drover lab env)"')

    guarded(go)


@lab_app.command("down")
def lab_down() -> None:
    """Stop and remove everything the lab created."""
    from lab import control

    def go() -> None:
        removed = control.down()
        out.print("lab down: " + (", ".join(removed) if removed else "nothing was up"))

    guarded(go)


@lab_app.command("status")
def lab_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Hosts, operator URIs for virsh, worker pids and domains."""
    from lab import control

    def go() -> None:
        st = control.status()
        if as_json:
            print_json(st)
            return
        if not st["up"]:
            out.print("lab is down")
            return
        for name, h in st["hosts"].items():
            doms = ", ".join(
                f"{d['name']}({'running' if d['active'] else 'off'})" for d in h["domains"]
            )
            alive = "alive" if h["worker_alive"] else "DEAD"
            out.print(
                f"{name}  {h['address']}  worker {h['worker_pid']} {alive}  "
                f"virsh -c '{h['operator_uri']}'  domains: {doms or '-'}"
            )

    guarded(go)


@lab_app.command("env")
def lab_env() -> None:
    """Print the export line that points drover at the lab's config."""
    from lab import control

    guarded(lambda: out.print(control.env_line(), markup=False))


# Commands kept in modules of their own; imported last, as they use the helpers above.
from producer import cli_evacuate, cli_flower, cli_redis_acl, cli_schedule  # noqa: E402

cli_evacuate.register(app)
cli_flower.register(app)
cli_redis_acl.register(app)
cli_schedule.register(app)


def main() -> None:
    """Run the CLI; usage errors become one line (Click's boxed help is for --help)."""
    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            pass  # building this error rendered the help already (Typer's rich help prints)
        else:
            where = exc.ctx.command_path if exc.ctx else "drover"
            # One line whatever Click echoes of the command line (it escapes what it quotes
            # today; a newline in a message would make two lines).
            err.print(plain(f"{where}: {exc.format_message()}"), markup=False, soft_wrap=True)
        code = EXIT_USAGE
    except typer.Abort:
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)
