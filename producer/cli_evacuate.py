"""`drover evacuate`, `drover host enable|disable` and `drover hosts`: draining hosts."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from producer import cli_drain_options as o
from producer.cli_common import check_timeout, drover, fail, goes_on, guarded, out, print_json
from producer.text import plain

HOST_STATES = ("disable", "enable")


def _split_hosts(value: str | None) -> list[str]:
    """--to H1,H2: empty items are a mistake worth a clear error, not something to skip."""
    if value is None:
        return []
    items = [h.strip() for h in value.split(",")]
    if any(not h for h in items):
        raise typer.BadParameter(f"--to {value!r} has an empty host name")
    return items


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `drover` CLI."""

    host_app = typer.Typer(
        add_completion=False, no_args_is_help=True, help="Maintenance mode of one host."
    )
    app.add_typer(host_app, name="host")

    @app.command()
    def evacuate(
        host: Annotated[str, typer.Argument(help="the host to empty (registry name)")],
        to: Annotated[
            str | None, typer.Option("--to", help="destinations H1,H2 (default: every host)")
        ] = None,
        max_parallel: Annotated[
            int | None,
            typer.Option("--max-parallel", help="at most N of its migrations at once"),
        ] = None,
        include_inactive: Annotated[
            bool,
            typer.Option("--include-inactive", help="move defined-but-off domains (offline)"),
        ] = False,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="print the plan; queue nothing")
        ] = False,
        tunnelled: o.Tunnelled = False,
        auto_converge: o.AutoConverge = False,
        bandwidth: o.Bandwidth = None,
        completion_timeout: o.CompletionTimeout = None,
        timeout_action: o.TimeoutActionOpt = None,
        policy: Annotated[
            str | None, typer.Option("--policy", help="every child's policy (drover policies)")
        ] = None,
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
        wait: Annotated[bool, typer.Option("--wait", help="follow until it ends")] = False,
        timeout: Annotated[float | None, typer.Option("--timeout", help="with --wait")] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Move every running domain off HOST (disabling it first), within the limits."""
        from producer.render import outcome_table, plan_table

        request: dict[str, Any] = {
            "host": host,
            "to": _split_hosts(to),
            "max_parallel": max_parallel,
            "include_inactive": include_inactive,
            "dry_run": dry_run,
            **o.drain_request_of(locals()),
        }

        check_timeout(timeout, wait or dry_run)

        def go() -> None:
            d = drover()
            evacuation_id = d.evacuate(d.evacuation_spec(**request))
            if not (wait or dry_run):
                print_json({"job_id": evacuation_id}) if as_json else out.print(evacuation_id)
                return
            with goes_on("evacuation", evacuation_id, as_json=as_json):  # Ctrl-C: say so
                if as_json or dry_run:
                    ev = d.wait_evacuation(evacuation_id, timeout)
                else:
                    from producer.follow import follow_evacuation

                    out.print(f"evacuation {evacuation_id}")
                    ev = follow_evacuation(d, evacuation_id, out.console, timeout)
            if as_json:
                print_json(ev.model_dump(mode="json"))
            if not as_json:
                out.print(plan_table(ev.plan or [], f"plan for {host} ({ev.id})"))
                if ev.outcome:
                    out.print(outcome_table(ev.outcome, host))
                said = f"evacuation {ev.id} {ev.state.value}" + _because(ev.reason)
                out.print(plain(said), markup=False, soft_wrap=True)
            wanted = "planned" if dry_run else "drained"
            if ev.state.value != wanted:
                fail(f"evacuation {ev.id} {ev.state.value}{_because(ev.reason)}")

        guarded(go)

    def _set(host: str, enabled: bool, reason: str | None) -> None:
        said = guarded(lambda: drover().set_host_enabled(host, enabled, reason))
        out.print(plain(said), markup=False)  # a reason already in Redis is quoted back

    @host_app.command("disable")
    def host_disable(
        host: Annotated[str, typer.Argument(help="registry name")],
        reason: Annotated[str | None, typer.Option("--reason")] = None,
    ) -> None:
        """Maintenance: HOST is never a destination until enabled again."""
        _set(host, False, reason)

    @host_app.command("enable")
    def host_enable(host: Annotated[str, typer.Argument(help="registry name")]) -> None:
        """Put HOST back among the destinations."""
        _set(host, True, None)

    @app.command()
    def hosts(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Each host: maintenance state, worker, free memory, running domains, migrations."""
        from producer.render import hosts_table

        def go() -> None:
            rows = drover().hosts()
            print_json(rows) if as_json else out.print(hosts_table(rows))

        guarded(go)


def _because(reason: str | None) -> str:
    return f": {reason}" if reason else ""
