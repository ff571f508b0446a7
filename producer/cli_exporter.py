"""`drover exporter [--listen ADDR:PORT] [--expose-all]`: the fleet's Prometheus exporter.

Loopback by default, as Flower: the series name every host, domain and evacuation of the
fleet, so listening on every interface (0.0.0.0, ::) must be asked for with --expose-all.
What it serves and why it runs as one active among standbys: producer/exporter.py.
"""

from __future__ import annotations

from typing import Annotated

import typer

from config.addresses import MAX_PORT, check_address, parse_ip, shown
from producer.cli_common import EXIT_USAGE, fail, guarded, notice
from producer.exporter_listen import DEFAULT_ADDRESS, DEFAULT_PORT, Listen

LISTEN_FORM = "ADDR:PORT (127.0.0.1:9640, [::1]:9640)"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `drover` CLI."""
    app.command()(exporter)


def parse_listen(text: str, expose_all: bool) -> Listen:
    """`--listen`: an IP address or host name and a port; ValueError with one line."""
    address, colon, port_text = text.rpartition(":")
    if not colon or not address:
        raise ValueError(f"--listen {shown(text)} is not {LISTEN_FORM}")
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
        ip = parse_ip(address)
        if ip is None or ip.version != 6:
            raise ValueError(f"--listen {shown(text)}: brackets hold an IPv6 address only")
    elif ":" in address:
        raise ValueError(
            f"--listen {shown(text)}: write an IPv6 address in brackets, {LISTEN_FORM}"
        )
    else:
        try:
            check_address(address)
        except ValueError as exc:
            raise ValueError(f"--listen {shown(text)}: {exc}") from None
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= MAX_PORT):
        raise ValueError(f"--listen {shown(text)}: the port must be 1 to {MAX_PORT}")
    ip = parse_ip(address)
    if ip is not None and ip.is_unspecified and not expose_all:
        raise ValueError(
            f"--listen {address} listens on every interface and would show the fleet to the "
            "network: add --expose-all if that is meant"
        )
    return Listen(address, int(port_text))


def exporter(
    listen: Annotated[
        str,
        typer.Option("--listen", help=f"address and port to serve /metrics on: {LISTEN_FORM}"),
    ] = f"{DEFAULT_ADDRESS}:{DEFAULT_PORT}",
    expose_all: Annotated[
        bool,
        typer.Option("--expose-all", help="allow a wildcard --listen address (0.0.0.0, ::)"),
    ] = False,
) -> None:
    """Serve the fleet's Prometheus series (jobs, waiting lines, evacuations, schedules,
    workers alive); run several: one is active, the others stand by."""
    try:
        where = parse_listen(listen, expose_all)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)

    def go() -> None:
        from config.settings import load_settings
        from producer.exporter import ExporterStartError, run_exporter

        settings = load_settings()
        try:
            run_exporter(settings, where, notice)
        except ExporterStartError as exc:
            fail(str(exc))

    guarded(go)
