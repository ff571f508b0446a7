"""`drover lab up|down|status|env`: the local lab, real libvirt hosts in namespaces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from producer.cli_common import fail, guarded, out, print_json

T = TypeVar("T")

lab_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The local lab: real libvirt hosts in namespaces.",
)


def lab_guarded(fn: Callable[[], T]) -> T:
    """`guarded`, and the lab's own refusals (LabError) as one line too."""
    from lab.proc import LabError

    def go() -> T:
        try:
            return fn()
        except LabError as exc:
            fail(str(exc))

    return guarded(go)


@lab_app.command("up")
def lab_up(
    hosts: Annotated[int, typer.Option("--hosts", help="number of hosts (2-8)")] = 2,
    guests: Annotated[
        int, typer.Option("--guests", help="idle guests idle-1..idle-N on lab1 (and dirty-1)")
    ] = 1,
    tls: Annotated[
        bool, typer.Option("--tls", help="a CA and host certificates; libvirtd on qemu+tls")
    ] = False,
    sentinel: Annotated[
        bool,
        typer.Option(
            "--sentinel", help="Redis as a primary, a replica and three sentinels (failover)"
        ),
    ] = False,
    linux_guests: Annotated[
        int,
        typer.Option(
            "--linux-guests", help="Linux guests linux-1..N on lab1, disks on shared storage"
        ),
    ] = 0,
    local_linux_guests: Annotated[
        int,
        typer.Option(
            "--local-linux-guests",
            help="Linux guests linux-local-1..N on lab1, disks on lab1's own storage",
        ),
    ] = 0,
) -> None:
    """Create lab1..labN: namespaces, libvirtd, workers, Redis; guests on lab1."""
    from lab import control

    def go() -> None:
        state = control.up(
            hosts,
            tls=tls,
            guests=guests,
            sentinel=sentinel,
            linux_guests=linux_guests,
            local_linux_guests=local_linux_guests,
        )
        out.print(f"lab up: {', '.join(state.hosts)}; config {state.config}")
        out.print('run: eval "$(drover lab env)"')

    lab_guarded(go)


@lab_app.command("down")
def lab_down() -> None:
    """Stop and remove everything the lab created."""
    from lab import control

    def go() -> None:
        removed = control.down()
        out.print("lab down: " + (", ".join(removed) if removed else "nothing was up"))

    lab_guarded(go)


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
                f"virsh -c '{h['operator_uri']}'  domains: {doms or '-'}  "
                f"metrics {h['metrics_url']}"
            )
        for g in st["linux_guests"]:
            out.print(f"{g['name']}  {g['address']}  {g['kind']} disk {g['disk']}")

    lab_guarded(go)


@lab_app.command("env")
def lab_env() -> None:
    """Print the export line that points drover at the lab's config."""
    from lab import control

    lab_guarded(lambda: out.print(control.env_line(), markup=False))
