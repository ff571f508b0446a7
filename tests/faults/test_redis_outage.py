"""Redis stopped for seconds during a perform, on the real lab (issue 11, case 3).

libvirt's migration does not need Redis, so nothing of it may be lost to the outage: the
source's worker keeps its monitor (progress, policy, abort check) running, holds the events it
cannot write and writes them once Redis is back, and its perform rides the outage out; a
`drover migrate --wait` and a `Drover.wait` that follow the job across the outage say so and
report the job's real end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import pairwise
from typing import IO, Any

import pytest

from jobs.model import Job
from lab import control
from tests.faults.conftest import (
    COMPLETION_TIMEOUT_S,
    FAULT_WINDOW_S,
    THROTTLED,
    assert_invariants,
    finish,
    in_transfer,
)
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for

# Long enough for a dozen progress reports and for the migration to end inside it (the
# completion timeout suspends the guest), shorter than a worker's redis_retry_for (30 s).
OUTAGE_S = 8.0
# The monitor reports once a second (tunables.progress_interval); in an outage it must keep
# that pace: no gap between two reports this long.
MAX_REPORT_GAP_S = 3.0
MIN_REPORTS_IN_OUTAGE = 3
CLI_START_S = 30.0

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("dirty_home", "workers_back", "redis_back")]


@pytest.fixture
def redis_back() -> Iterator[None]:
    """Redis answers again after the case, whatever it left behind."""
    yield
    if not control.status()["redis_alive"]:
        control.start_redis()


class Cli:
    """`drover migrate ... --wait` as an operator runs it, its output collected as it comes."""

    def __init__(self, config: str, *args: str) -> None:
        env = {**os.environ, "DROVER_CONFIG": config}
        env.pop("DROVER_REDIS_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _collect(stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def job_id(self) -> str:
        wait_for(lambda: any(line.startswith("job ") for line in self.out), CLI_START_S, "a job")
        return next(line.split()[1] for line in self.out if line.startswith("job "))

    def said(self, text: str) -> bool:
        return any(text in line for line in self.err)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Waiter(threading.Thread):
    """`Drover.wait` on its own thread, across the outage."""

    def __init__(self, lab: Lab, job_id: str) -> None:
        super().__init__(daemon=True)
        self.lab, self.job_id = lab, job_id
        self.job: Job | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.job = self.lab.drover.wait(self.job_id, timeout=JOB_TIMEOUT_S)
        except BaseException as exc:
            self.error = exc


def ts(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["ts"]))


def test_redis_stopped_during_perform_loses_nothing(lab: Lab) -> None:
    cli = Cli(
        lab.config,
        "migrate",
        "dirty-1",
        "--from",
        "lab1",
        "--to",
        "lab2",
        "--live",
        "--auto-converge",
        "--bandwidth",
        str(THROTTLED["bandwidth_mib"]),
        "--completion-timeout",
        str(COMPLETION_TIMEOUT_S),
        "--wait",
    )
    try:
        job_id = cli.job_id()
        wait_for(in_transfer(lab, job_id), FAULT_WINDOW_S, "the migration to be in flight")
        waiter = Waiter(lab, job_id)
        control.stop_redis()
        down_at, stopped = datetime.now(UTC), time.monotonic()
        # Redis stays away OUTAGE_S, and at least until the CLI has noticed it (or given up).
        wait_for(
            lambda: (
                time.monotonic() - stopped >= OUTAGE_S
                and (cli.said("unreachable") or cli.proc.poll() is not None)
            ),
            OUTAGE_S + CLI_START_S,
            "the outage to last and the CLI to notice it",
        )
        control.start_redis()
        up_at = datetime.now(UTC)
        wait_for(lambda: cli.proc.poll() is not None, JOB_TIMEOUT_S, "drover migrate --wait")
        waiter.join(JOB_TIMEOUT_S)
    finally:
        cli.stop()
    err = "\n".join(cli.err)
    assert cli.proc.returncode == 0, err
    assert cli.said("still following") and cli.said("is back"), err
    assert waiter.error is None and waiter.job is not None, repr(waiter.error)
    assert waiter.job.state.value == "succeeded", waiter.job.reason

    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "succeeded", job.reason

    events = list(lab.drover.events(job_id))
    names = [e["event"] for e in events]
    # The perform ran through the outage in the task that started it: nothing re-attached.
    assert "phase.recovering" not in names and "phase.failed" not in names, names
    assert "migration.abort_check_failed" in names, names
    assert names[-1] == "job.state" and events[-1]["state"] == "succeeded", names[-3:]
    progress = [e for e in events if e["event"] == "migration.progress"]
    during = [e for e in progress if down_at < ts(e) < up_at]
    assert len(during) >= MIN_REPORTS_IN_OUTAGE, f"{len(during)} progress events in the outage"
    gaps = [(ts(b) - ts(a)).total_seconds() for a, b in pairwise(progress)]
    assert max(gaps) < MAX_REPORT_GAP_S, f"the monitor paused {max(gaps):.1f}s"
    assert [ts(e) for e in progress] == sorted(ts(e) for e in progress), "reports out of order"
