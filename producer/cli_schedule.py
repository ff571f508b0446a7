"""`drover schedule add|list|remove` and `drover beat`: scheduled evacuations.

Schedules are stored in Redis (schedules/) and fired by `drover beat`; every time
is UTC. Bad input is one line on stderr and exit 2, and never reaches Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from config.addresses import shown
from producer import cli_drain_options as o
from producer.cli_common import EXIT_USAGE, fail, guarded, notice, out, print_json
from producer.text import cell

if TYPE_CHECKING:
    from rich.table import Table

    from schedules.records import Schedule

NONE_TEXT = "-"
# Kept here so that `drover --help` does not import Celery and redbeat.
CRON_HELP = "cron expression, 5 fields, in UTC: minute hour day-of-month month day-of-week"
AT_HELP = "once, at this ISO-8601 time in the future (2030-06-01T03:00:00Z); no offset = UTC"


def _hosts(value: str | None) -> list[str]:
    """`--to H1,H2` as a list; None (any host) is the empty list."""
    if value is None:
        return []
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        fail(f"--to {shown(value)}: empty host name", EXIT_USAGE)
    return names


def _next_run_text(schedule: Schedule) -> str:
    from jobs.store import now
    from schedules.records import utc_text

    if schedule.next_run is None:
        return NONE_TEXT
    overdue = " (overdue)" if schedule.next_run < now() else ""
    return utc_text(schedule.next_run) + overdue


def _last_run_text(schedule: Schedule) -> str:
    from schedules.records import utc_text

    run = schedule.last_run
    if run is not None:
        done = f"evacuation {run.evacuation_id}" if run.evacuation_id else f"refused: {run.error}"
        return f"{utc_text(run.at)} {done}"
    if schedule.sent_at is not None:
        return f"sent {utc_text(schedule.sent_at)}, not run yet"
    return NONE_TEXT


def schedules_table(schedules: list[Schedule]) -> Table:
    from rich.table import Table

    table = Table("id", "what", "when", "next run (UTC)", "last run (UTC)", box=None)
    for s in schedules:
        # Entries come from Redis (not trusted): stripped and escaped for Rich markup.
        row = (s.id, s.what(), s.when(), _next_run_text(s), _last_run_text(s))
        table.add_row(*(cell(value) for value in row))
    return table


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `drover` CLI."""
    schedule_app = typer.Typer(
        add_completion=False,
        no_args_is_help=True,
        help="Scheduled evacuations: stored in Redis, fired by `drover beat`; times in UTC.",
    )
    add_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Add a schedule.")
    schedule_app.add_typer(add_app, name="add")
    app.add_typer(schedule_app, name="schedule")

    @add_app.command("evacuate")
    def add_evacuate(
        host: Annotated[str, typer.Argument(help="host to evacuate (registry name)")],
        cron: Annotated[str | None, typer.Option("--cron", help=CRON_HELP)] = None,
        at: Annotated[str | None, typer.Option("--at", help=AT_HELP)] = None,
        to: Annotated[
            str | None, typer.Option("--to", help="destinations H1,H2 (default: any host)")
        ] = None,
        max_parallel: Annotated[
            int | None, typer.Option("--max-parallel", min=1, help="migrations at a time")
        ] = None,
        include_inactive: Annotated[
            bool, typer.Option("--include-inactive", help="move shut-off guests too")
        ] = False,
        policy: Annotated[
            str | None, typer.Option("--policy", help="every child's policy (drover policies)")
        ] = None,
        tunnelled: o.Tunnelled = False,
        auto_converge: o.AutoConverge = False,
        bandwidth: o.Bandwidth = None,
        completion_timeout: o.CompletionTimeout = None,
        timeout_action: o.TimeoutActionOpt = None,
        tls: o.Tls = False,
        copy_storage: o.CopyStorage = None,
        parallel: o.Parallel = None,
        compressed: o.Compressed = False,
        comp_methods: o.CompMethods = None,
        comp_mt_level: o.CompMtLevel = None,
        comp_mt_threads: o.CompMtThreads = None,
        comp_mt_dthreads: o.CompMtDthreads = None,
        comp_xbzrle_cache: o.CompXbzrleCache = None,
        comp_zlib_level: o.CompZlibLevel = None,
        comp_zstd_level: o.CompZstdLevel = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Evacuate HOST on a cron schedule (--cron) or once (--at); times are UTC. Every
        option `drover evacuate` gives its children is kept and applied when it fires."""
        from pydantic import ValidationError

        from config.settings import load_settings
        from jobs.spec import first_error
        from producer.hosts import producer_name
        from schedules.records import EvacuationRequest, utc_text
        from schedules.store import ScheduleStore

        if (cron is None) == (at is None):
            fail("give exactly one of --cron EXPR and --at TIME", EXIT_USAGE)
        options = o.drain_request_of(locals())
        try:
            request = EvacuationRequest.model_validate(
                {
                    "host": host,
                    "to": _hosts(to),
                    "max_parallel": max_parallel,
                    "include_inactive": include_inactive,
                    **options,
                }
            )
        except ValidationError as exc:
            fail(first_error(exc), EXIT_USAGE)

        def go() -> None:
            store = ScheduleStore(load_settings())
            added = store.add_evacuation(request, cron=cron, at=at, by=producer_name())
            if as_json:
                print_json(added.summary())
                return
            next_run = utc_text(added.next_run) if added.next_run else NONE_TEXT
            out.print(
                f"schedule {added.id}: {added.what()}, {added.when()}; next run {next_run}"
                " (times in UTC)",
                markup=False,
                soft_wrap=True,
            )

        guarded(go)

    @schedule_app.command("list")
    def list_schedules(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Every schedule: id, what, when, next run and last run (UTC)."""
        from config.settings import load_settings
        from schedules.store import ScheduleStore

        def go() -> None:
            unreadable: list[str] = []
            found = ScheduleStore(load_settings()).list(unreadable=unreadable)
            if as_json:
                print_json([s.summary() for s in found])
            elif not found:
                out.print("no schedules")
            else:
                out.print(schedules_table(found))
            for reason in unreadable:  # left out of the list, never silently
                notice(f"{reason}; left out of this list (drover schedule remove ID removes it)")

        guarded(go)

    @schedule_app.command("remove")
    def remove(schedule_id: Annotated[str, typer.Argument(help="schedule id")]) -> None:
        """Remove a schedule: it never fires again, and a firing already sent is ignored."""
        from config.settings import load_settings
        from schedules.records import ScheduleNotFound, check_schedule_id
        from schedules.removal import tell_removed
        from schedules.store import ScheduleStore

        def go() -> None:
            check_schedule_id(schedule_id)
            settings = load_settings()
            try:
                host = ScheduleStore(settings).remove(schedule_id)
            except ScheduleNotFound as exc:
                fail(str(exc), EXIT_USAGE)
            if host is not None:  # its worker never fires it again, whatever Redis holds
                tell_removed(settings, schedule_id, host)
            out.print(f"removed schedule {schedule_id}", markup=False)

        guarded(go)

    @app.command()
    def beat(loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO") -> None:
        """Run the scheduler that fires `drover schedule` entries; one fires at a time.

        Run it on one or more machines that reach Redis: the others wait for the lock and take
        over when the active one stops.
        """
        from config.settings import load_settings
        from schedules.beat import run_beat

        guarded(lambda: run_beat(load_settings(), loglevel=loglevel))
