"""A worker's own duties under faults an operator meets: a config file saved with a typo, and
a warm shutdown (a service restart on deploy) while a long migration runs (issue 11)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from jobs.store import JobStore
from lab import control
from lab.proc import alive
from producer.api import SubmitError
from tests.faults.conftest import assert_invariants, finish, in_transfer
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, replace_config, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("dirty_home", "workers_back")]

A_TYPO = "\n[tunables\nheartbeat_interval = \n"  # what an editor saves mid-edit
HEARTBEAT_TTL_S = 10.0  # tunables.heartbeat_ttl's default: a stopped heartbeat shows by then
# Long enough for a migration at 8 MiB/s (it never converges) to be draining when it passes.
# The drain timeout leaves time for a job to stall on the draining host and a worker to start
# beside it; the completion timeout (then the guest is paused and the rest copied at once)
# comes well after the hand-over, and bounds the case.
DRAIN_TIMEOUT_S = 30
STALL_AFTER_S = 6
COMPLETION_TIMEOUT_S = 60


def events_named(lab: Lab, job_id: str, name: str) -> list[dict[str, Any]]:
    return [e for e in lab.drover.events(job_id) if e["event"] == name]


def host_rows(lab: Lab) -> dict[str, dict[str, Any]]:
    return {row["host"]: row for row in lab.drover.hosts()}


def reported_at(store: JobStore, host: str) -> datetime | None:
    ts = store.host_report(host).get("ts")
    return datetime.fromisoformat(ts) if ts else None


def test_a_config_saved_with_a_typo_during_a_migration(lab: Lab, lab_config_file: Path) -> None:
    config_file = lab_config_file
    good = config_file.read_text()
    job_id = lab.drover.submit(
        domain="dirty-1", src="lab1", dst="lab2", live=True, bandwidth_mib=8,
        completion_timeout_s=30,
    )  # fmt: skip
    wait_for(in_transfer(lab, job_id), 60, "the migration to be in flight")
    replace_config(config_file, good + A_TYPO)
    store = lab.drover.store

    # Every worker says so, on `drover hosts` and on the stream of the job it takes part in.
    wait_for(
        lambda: all(row["config_error"] for row in host_rows(lab).values()),
        30,
        "every worker to report the bad config",
    )
    assert "not valid TOML" in host_rows(lab)["lab1"]["config_error"]
    wait_for(lambda: bool(events_named(lab, job_id, "config.invalid")), 30, "config.invalid")
    # ...and goes on: heartbeats and reports keep coming well past their time to live.
    since = {host: reported_at(store, host) for host in lab.hosts()}
    for host in lab.hosts():
        first = since[host]
        assert first is not None
        wait_for(
            lambda h=host, f=first: (  # type: ignore[misc]
                (at := reported_at(store, h)) is not None
                and (at - f).total_seconds() > HEARTBEAT_TTL_S
            ),
            HEARTBEAT_TTL_S * 3,
            f"{host}'s keeper to keep reporting with a bad config",
        )
        assert store.alive(host), f"{host} looks dead with a bad config"
    # Its domain is still held: a second migration of the same guest is refused.
    with pytest.raises(SubmitError, match="already has an active job"):
        lab.drover.submit(domain="dirty-1", src="lab1", dst="lab3", live=True)

    replace_config(config_file, good)
    wait_for(
        lambda: not any(row["config_error"] for row in host_rows(lab).values()),
        30,
        "every worker to take the fixed config",
    )
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "succeeded", job.reason
    assert all(row["worker_alive"] for row in host_rows(lab).values())


@pytest.fixture
def idle_home(lab: Lab) -> Iterator[None]:
    lab.home("idle-1")
    yield
    lab.home("idle-1")


def sigterm_worker(host: str) -> int:
    """A warm shutdown, as a service manager's stop sends it; the worker's pid."""
    pid = int(control.status()["hosts"][host]["worker_pid"])
    os.kill(pid, signal.SIGTERM)
    return pid


def drain_config(fault_config: Callable[[str], None]) -> None:
    fault_config(f"[tunables]\ndrain_timeout = {DRAIN_TIMEOUT_S}\nstall_after = {STALL_AFTER_S}\n")


def never_converging(lab: Lab, control_flow: str) -> str:
    job_id = lab.drover.submit(
        domain="dirty-1", src="lab1", dst="lab2", live=True, control=control_flow,
        bandwidth_mib=8, completion_timeout_s=COMPLETION_TIMEOUT_S,
    )  # fmt: skip
    wait_for(in_transfer(lab, job_id), 60, "the migration to be in flight")
    return job_id


@pytest.mark.usefixtures("idle_home")
def test_warm_shutdown_during_a_long_p2p_migration(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    drain_config(fault_config)
    job_id = never_converging(lab, "p2p")
    old_pid = sigterm_worker("lab1")

    # The host says it is draining, with the job it still runs; it is not taking work.
    def draining() -> bool:
        row = host_rows(lab)["lab1"]
        return bool(row["draining"]) and job_id in row["draining"]["running"]

    wait_for(draining, 30, "lab1 to show draining with its migration")
    assert not host_rows(lab)["lab1"]["worker_alive"]

    # A job from the draining host says what it waits for, then goes stalled.
    queued = lab.drover.submit(domain="idle-1", src="lab1", dst="lab3", live=True)
    wait_for(lambda: lab.drover.job(queued).state.value == "stalled", 60, "the new job to stall")
    stalled = lab.drover.job(queued)
    assert stalled.reason is not None and "shutting down" in stalled.reason, stalled.reason

    # A worker started beside the draining one leaves the running migration to it...
    control.restart_worker("lab1")
    assert alive(old_pid)
    assert lab.drover.job(job_id).state.value == "migrating"
    # ...until the drain timeout hands it over: then the old worker exits and the new one
    # re-attaches to the migration libvirtd carried on with.
    wait_for(lambda: bool(events_named(lab, job_id, "phase.handed_over")), 60, "the hand-over")
    wait_for(lambda: not alive(old_pid), 60, "the draining worker to exit")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "succeeded", job.reason
    names = [e["event"] for e in lab.drover.events(job_id) if e.get("phase") == "perform"]
    # One monitor at a time: recovery came once, and only after the hand-over.
    assert names.count("phase.recovering") == 1, names
    assert names.index("phase.handed_over") < names.index("phase.recovering"), names
    assert names.count("migration.started") == 1, names

    # The waiting job went on with the new worker, and nothing of its stall is left on it.
    other = finish(lab, queued)
    assert other.state.value == "succeeded", other.reason
    assert other.stalled_from is None and other.reason is None, other.reason
    assert_invariants(lab, other, domain="idle-1")


def test_warm_shutdown_drain_timeout_aborts_a_direct_migration(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    drain_config(fault_config)
    job_id = never_converging(lab, "direct")
    old_pid = sigterm_worker("lab1")
    job = finish(lab, job_id)
    # A managed-direct migration cannot outlive its worker: aborted, the guest stays home.
    assert_invariants(lab, job)
    assert job.state.value == "failed"
    assert job.reason is not None and "drain timeout" in job.reason, job.reason
    wait_for(lambda: not alive(old_pid), JOB_TIMEOUT_S, "the draining worker to exit")
