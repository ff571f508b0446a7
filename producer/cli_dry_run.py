"""`drover migrate --dry-run` output, and `--migrate-disks`' comma-separated list.

A dry run is always waited for: its answer is the verdicts. Each check's verdict (per host),
then the outcome; exit 0 when every check passed (`checked`), 1 when one refused.
"""

from __future__ import annotations

from typing import Any

from producer.cli_common import fail, out, print_json
from producer.text import plain

DRY_RUN_TIMEOUT_S = 120.0  # the checks read libvirt and the disks; no migration to wait for


def disk_list(value: str | None) -> list[str] | None:
    """`vda,vdb` -> ["vda", "vdb"] (the spec validates each name); None when not given."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",")]


def show_dry_run(d: Any, job_id: str, timeout: float | None, as_json: bool) -> None:
    """Wait for the dry run, print every verdict, exit by the outcome."""
    job = d.wait(job_id, timeout or DRY_RUN_TIMEOUT_S)
    checks = [*job.result.source_checks, *job.result.destination_checks]
    if as_json:
        print_json(
            job.summary() | {"checks": [c.model_dump(mode="json") for c in checks]},
        )
    else:
        out.print(f"dry run {job_id}: nothing moved", markup=False)
        for c in checks:
            verdict = "pass" if c.passed else f"REFUSED: {c.reason}"
            out.print(plain(f"  {c.host:<12} {c.check:<14} {verdict}"), markup=False)
    if job.state.value != "checked":
        fail(f"dry run {job_id} {job.state.value}: {job.reason}")
