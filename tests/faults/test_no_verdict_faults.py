"""A job never says where its guest is while libvirt cannot be asked: faults found by trying.

- the destination's libvirtd down through every try of finish: the job used to end `failed`
  with its guest running on the destination; now it waits, and succeeds once libvirtd is
  back (recovery settles finish from libvirt);
- the source's worker killed while confirm waited for its retry (its libvirtd down): the job
  used to stay `finishing` for ever, holding its slot and lease; the retry's phase now reads
  as never started, and recovery sends it again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from jobs.states import JobState
from lab import control
from tests.faults.conftest import THROTTLED, assert_invariants, check, finish, phase_started
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("dirty_home", "workers_back")]

# The phase under the fault waits this long after its start: the window to land the fault.
PHASE_DELAY_S = 3
# Recovery sweeps often, and a step quiet this long is sent again.
QUICK_RECOVERY = """[tunables]
watchdog_interval = 1
redispatch_after = 3
retry_delay = {retry_delay}
[tunables.phase_retries]
source_preflight = 3
destination_prepare = 3
finish = 1
confirm = 1
[faults.phase_delays]
{phase} = {delay}
"""


def events_named(lab: Lab, job_id: str, name: str) -> list[dict[str, object]]:
    return [e for e in lab.drover.events(job_id) if e["event"] == name]


def submit(lab: Lab) -> str:
    """dirty-1 from lab1 to lab2, landing in bounded time (the suite's completion timeout)."""
    options: dict[str, Any] = {"live": True, **THROTTLED}
    return lab.drover.submit(domain="dirty-1", src="lab1", dst="lab2", **options)


def test_a_destination_libvirtd_down_through_finish_leaves_the_verdict_to_libvirt(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    fault_config(QUICK_RECOVERY.format(retry_delay=1, phase="finish", delay=PHASE_DELAY_S))
    job_id = submit(lab)
    wait_for(phase_started(lab, job_id, "finish"), JOB_TIMEOUT_S, "finish to start")
    control.stop_libvirtd("lab2")
    try:
        interrupted = lambda: bool(events_named(lab, job_id, "phase.interrupted"))  # noqa: E731
        wait_for(interrupted, JOB_TIMEOUT_S, "finish to stop without a verdict")
        job = lab.drover.job(job_id)
        check(
            not job.terminal, f"job {job.state.value} while lab2's libvirtd is down: {job.reason}"
        )
        check("libvirt's to say" in (job.waiting_for or ""), f"waiting for: {job.waiting_for}")
    finally:
        control.start_libvirtd("lab2")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    check(job.state is JobState.SUCCEEDED, f"job {job.state.value}: {job.reason}")


def test_a_worker_killed_while_its_phase_waits_for_a_retry_leaves_no_job_stuck(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    # A long wait before the retry: the worker is killed inside it, the retry dies with it.
    fault_config(QUICK_RECOVERY.format(retry_delay=30, phase="confirm", delay=PHASE_DELAY_S))
    job_id = submit(lab)
    wait_for(phase_started(lab, job_id, "confirm"), JOB_TIMEOUT_S, "confirm to start")
    control.stop_libvirtd("lab1")
    try:
        retrying = lambda: bool(events_named(lab, job_id, "phase.retrying"))  # noqa: E731
        wait_for(retrying, JOB_TIMEOUT_S, "confirm to wait for its retry")
        control.kill_worker("lab1")
    finally:
        control.start_libvirtd("lab1")
    control.restart_worker("lab1")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    check(job.state is JobState.SUCCEEDED, f"job {job.state.value}: {job.reason}")
