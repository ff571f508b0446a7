"""`drover migrate|abort|postcopy|events|jobs|job`: a migration job, from queue to end.

Every refusal is one line on stderr and a non-zero exit; `--json` gives scripts stable output.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from producer import cli_drain_options as o
from producer.cli_common import (
    EXIT_USAGE,
    check_timeout,
    drover,
    fail,
    follow_job,
    goes_on,
    guarded,
    notice,
    out,
    print_json,
    queued_unsaid,
)
from producer.cli_dry_run import disk_list, show_dry_run
from producer.cli_xml import xml_request
from producer.text import plain, plain_data


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `drover` CLI."""
    for command in COMMANDS:
        app.command()(command)


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
    comp_methods: o.CompMethods = None,
    comp_mt_level: o.CompMtLevel = None,
    comp_mt_threads: o.CompMtThreads = None,
    comp_mt_dthreads: o.CompMtDthreads = None,
    comp_xbzrle_cache: o.CompXbzrleCache = None,
    comp_zlib_level: o.CompZlibLevel = None,
    comp_zstd_level: o.CompZstdLevel = None,
    postcopy: Annotated[
        bool, typer.Option("--postcopy", help="allow post-copy (over a policy that does not)")
    ] = False,
    bandwidth: Annotated[int | None, typer.Option("--bandwidth", help="MiB/s cap")] = None,
    postcopy_bandwidth: Annotated[
        int | None, typer.Option("--postcopy-bandwidth", help="MiB/s cap of post-copy")
    ] = None,
    policy: Annotated[
        str | None, typer.Option("--policy", help="migration policy (drover policies)")
    ] = None,
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
    unsafe: Annotated[
        bool, typer.Option("--unsafe", help="migrate disks libvirt deems unsafe (cache mode)")
    ] = False,
    migrate_disks: Annotated[
        str | None,
        typer.Option("--migrate-disks", help="vda,vdb: copy only these (with --copy-storage)"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="run every pre-check, move nothing")
    ] = False,
    xml: Annotated[
        str | None, typer.Option("--xml", help="FILE: domain XML for the destination")
    ] = None,
    persistent_xml: Annotated[
        str | None,
        typer.Option("--persistent-xml", help="FILE: persistent domain XML (with --persistent)"),
    ] = None,
    tls_destination: Annotated[
        str | None, typer.Option("--tls-destination", help="name in the dest's TLS certificate")
    ] = None,
    disks_port: Annotated[
        int | None, typer.Option("--disks-port", help="NBD port for --copy-storage")
    ] = None,
    disks_uri: Annotated[
        str | None, typer.Option("--disks-uri", help="tcp://HOST[:PORT] | unix:///PATH for disks")
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
        "compression": o.compression_request_of(locals()),
        "postcopy": postcopy,
        "bandwidth_mib": bandwidth,
        "postcopy_bandwidth_mib": postcopy_bandwidth,
        "policy": policy,
        "completion_timeout_s": completion_timeout,
        "timeout_action": timeout_action,
        "parallel": parallel,
        "copy_storage": copy_storage,
        "migrate_uri": migrate_uri,
        "listen_address": listen_address,
        "unsafe": unsafe,
        "migrate_disks": disk_list(migrate_disks),
        "dry_run": dry_run,
        "tls_destination": tls_destination,
        "disks_port": disks_port,
        "disks_uri": disks_uri,
    } | xml_request(xml, persistent_xml)

    check_timeout(timeout, wait or dry_run)

    def go() -> None:
        d = drover()
        job_id = d.submit(d.spec(**request))
        if dry_run:
            with goes_on("job", job_id, as_json=as_json):  # Ctrl-C: it goes on, we say so
                show_dry_run(d, job_id, timeout, as_json)
            return
        if not wait:
            with queued_unsaid(job_id):
                print_json({"job_id": job_id}) if as_json else out.print(job_id)
            return
        job = follow_job(d, job_id, timeout, as_json)
        if as_json:
            phases = {k: v.model_dump(mode="json") for k, v in job.phases.items()}
            print_json(job.summary() | {"phases": phases})
        if job.state.value != "succeeded":
            fail(f"job {job_id} {job.state.value}: {job.reason}")

    guarded(go)


def abort(job_id: Annotated[str, typer.Argument(help="job id")]) -> None:
    """Abort a job: queued ones never start, a running migration is aborted in libvirt."""
    out.print(plain(guarded(lambda: drover().abort(job_id))), markup=False)


def postcopy(job_id: Annotated[str, typer.Argument(help="a running migration")]) -> None:
    """Switch a running migration to post-copy (its policy must allow post-copy)."""
    line = guarded(lambda: drover().start_postcopy(job_id))
    out.print(plain(line), markup=False)


def events(
    job_id: Annotated[str, typer.Argument(help="job id")],
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print a job's events (JSON lines with --json); --follow until the job ends."""
    from producer.render import event_line
    from producer.waiting import events_of

    seen: set[str] = set()  # its events' kinds ("job", "evacuation", ...): what it is

    def go() -> None:
        for ev in events_of(drover(), job_id, follow):  # Redis away at first: one line at once
            seen.add(str(ev.get("event")).split(".")[0])
            print_json(ev) if as_json else out.print(event_line(ev), markup=False, soft_wrap=True)
            sys.stdout.flush()

    with goes_on(seen, job_id, when=follow):  # no JSON of its own: the caller named the id
        guarded(go)


def jobs(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 50,
    state: Annotated[
        list[str] | None,
        typer.Option("--state", help="only these states (repeat, or comma-separated)"),
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="only jobs from or to HOST, its evacuations")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="created since: a duration (30m, 2h, 7d) or an ISO time"),
    ] = None,
) -> None:
    """List recent jobs with state, domain, hosts and duration (newest first)."""
    # Not through the Python API: listing needs no Celery, and this command should be quick.
    from config.settings import load_settings
    from producer.jobs_list import job_filter, list_jobs

    def go() -> None:
        settings = load_settings()
        flt = job_filter(settings, states=state or (), host=host, since=since)
        unreadable: list[str] = []
        found = list_jobs(settings, flt, limit, full=False, unreadable=unreadable)
        if as_json:
            print_json([j.summary() for j in found])
        else:
            from producer.render import jobs_table  # Rich's tables: not for JSON

            out.print(jobs_table(found))
        for reason in unreadable:  # left out of the list, never silently
            notice(f"{reason}; left out of this list")

    guarded(go)


def job(
    job_id: Annotated[str, typer.Argument(help="job id")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one job (phases, hosts, timings, result, effective policy and where each of its
    values came from) or evacuation (plan, children, outcome)."""

    def go() -> None:
        j = drover().record(job_id)
        data = j.model_dump(mode="json")
        if as_json:
            print_json(data)  # json.dumps escapes every control and non-ASCII character
        else:  # Rich re-dumps it without ensure_ascii: DEL, C1 and bidi controls would pass
            out.print_json(json.dumps(plain_data(data), default=str))
            policy = getattr(j, "policy", None)
            if policy is not None:  # recorded by the source worker when perform began
                from producer.render import policy_table

                out.print(policy_table(policy, f"effective policy {policy.name}"))

    guarded(go)


# In the order `drover --help` lists them; cli/main.py runs these without the other commands.
COMMANDS = (migrate, abort, postcopy, events, jobs, job)
COMMAND_NAMES = frozenset(command.__name__ for command in COMMANDS)  # Typer's names for them
