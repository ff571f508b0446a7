"""`drover tune|force-complete`: the operator's control of a running migration.

Both are refused with one line and a non-zero exit for a job that is not migrating (here, or
by the source worker after asking libvirt), and `tune` for numbers out of bounds before
anything is sent; on success they print what the source worker did.
"""

from __future__ import annotations

from typing import Annotated

import typer

from producer.cli_common import drover, guarded, out
from producer.text import plain


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `drover` CLI."""
    app.command()(tune)
    app.command("force-complete")(force_complete)


def tune(
    job_id: Annotated[str, typer.Argument(help="a migrating job")],
    bandwidth: Annotated[
        int | None, typer.Option("--bandwidth", help="pre-copy MiB/s cap (0: none)")
    ] = None,
    postcopy_bandwidth: Annotated[
        int | None, typer.Option("--postcopy-bandwidth", help="post-copy MiB/s cap (0: none)")
    ] = None,
    max_downtime: Annotated[
        int | None, typer.Option("--max-downtime", help="longest final pause, ms")
    ] = None,
) -> None:
    """Change a running migration's bandwidth and allowed downtime (libvirt's
    migrateSetMaxSpeed / migrateSetMaxDowntime on the source host)."""
    line = guarded(
        lambda: drover().tune(
            job_id,
            bandwidth_mib=bandwidth,
            postcopy_bandwidth_mib=postcopy_bandwidth,
            max_downtime_ms=max_downtime,
        )
    )
    out.print(plain(line), markup=False)


def force_complete(job_id: Annotated[str, typer.Argument(help="a migrating job")]) -> None:
    """Finish a running migration now: post-copy where its policy allows it, else pause the
    guest until it has arrived (it resumes there)."""
    line = guarded(lambda: drover().force_complete(job_id))
    out.print(plain(line), markup=False)
