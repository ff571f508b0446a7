"""The fault-injection suite's tools: a throttled migration in flight, and the invariants.

Every case ends by checking, through libvirt on every host, what must hold whatever failed:
the guest runs on exactly one host; its definitions match the job's flags and final state;
the job is terminal and its recorded outcome matches reality; nothing is left held.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest

from jobs.model import Job
from jobs.store import ACTIVE_JOBS, JobNotFound, JobStore, domain_lock_key, reservations_key
from lab import control
from producer.api import SubmitError
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, replace_config, wait_for
from tests.support.postcopy import lift_postcopy_cap

# dirty-1 at this cap stays in flight long enough to land a fault. Whether auto-converge
# alone ever finishes it depends on how fast TCG runs the throttled guest (measured: from
# 20 s to never), so the job's completion timeout suspends it after COMPLETION_TIMEOUT_S and
# the rest is copied at once: every case ends in bounded time, by drover's own means.
COMPLETION_TIMEOUT_S = 10
THROTTLED = {
    "auto_converge": True,
    "bandwidth_mib": 64,
    "completion_timeout_s": COMPLETION_TIMEOUT_S,
}
FAULT_WINDOW_S = 60.0
# A failed case's post-copy is finished at this speed (MiB/s) before the next case.
SETTLE_MIB = 256


@dataclass
class Tally:
    """Counts for the closing note: cases run and invariant checks made."""

    cases: int = 0
    checks: int = 0
    outcomes: dict[str, str] = field(default_factory=dict)


TALLY = Tally()


def in_transfer(lab: Lab, job_id: str) -> Callable[[], bool]:
    def check() -> bool:
        return any(
            e["event"] == "migration.progress" and e.get("stage") == "transfer"
            for e in lab.drover.events(job_id)
        )

    return check


def phase_started(lab: Lab, job_id: str, phase: str) -> Callable[[], bool]:
    def check() -> bool:
        return phase in lab.drover.job(job_id).phases

    return check


def start_throttled(lab: Lab, **options: Any) -> str:
    """Submit dirty-1 lab1 -> lab2, throttled, and return once memory is on the wire."""
    job_id = lab.drover.submit(
        domain="dirty-1", src="lab1", dst="lab2", live=True, **(THROTTLED | options)
    )
    wait_for(in_transfer(lab, job_id), FAULT_WINDOW_S, "the migration to be in flight")
    return job_id


def check(condition: bool, message: str) -> None:
    TALLY.checks += 1
    assert condition, message


def assert_invariants(lab: Lab, job: Job, domain: str = "dirty-1") -> None:
    """What must hold after any fault, checked through libvirt on every host."""
    TALLY.cases += 1
    TALLY.outcomes[job.id] = job.state.value
    check(job.terminal, f"job {job.id} is {job.state.value}, not terminal")
    running = lab.running_on(domain)
    check(len(running) == 1, f"{domain} runs on {running}")
    here = running[0]
    spec = job.spec
    # Running, not paused: a guest suspended by a completion timeout resumes wherever it is.
    check(
        lab.view(here, domain).state == libvirt.VIR_DOMAIN_RUNNING,
        f"{domain} is not running on {here} (state {lab.view(here, domain).state})",
    )
    if job.state.value == "succeeded":
        check(here == spec.dst, f"job succeeded but {domain} runs on {here}")
        check(
            lab.view(spec.dst, domain).persistent == spec.persistent,
            "destination definition does not match --persistent",
        )
        check(
            lab.view(spec.src, domain).exists != spec.undefine_source,
            "source definition does not match --undefine-source",
        )
    else:
        check(here == spec.src, f"job {job.state.value} but {domain} runs on {here}")
        check(lab.view(spec.src, domain).persistent, "the source lost its definition")
        check(not lab.view(spec.dst, domain).exists, "a copy was left on the destination")
        check(bool(job.reason), "a failed job must say why")
    store = lab.drover.store
    for host in (spec.src, spec.dst):
        check(
            store.reserved_mib(host) == 0,
            f"a reservation is left on {host}: {held_by(store, host)}",
        )
    check(not store.r.sismember(ACTIVE_JOBS, job.id), "the job is still marked active")
    check(store.r.get(domain_lock_key("name", domain)) is None, "the name lease is left")
    uuid = job.facts.uuid if job.facts is not None else None
    if uuid:
        check(store.r.get(domain_lock_key("uuid", uuid)) is None, "the uuid lease is left")


def held_by(store: JobStore, host: str) -> str:
    """Which jobs hold memory on `host`, and in what state: what a failed check needs to say."""
    held = store.r.hgetall(reservations_key(host))
    return ", ".join(
        f"{job_id} ({store.state(job_id).value}) {mib} MiB" for job_id, mib in held.items()
    )


def finish(lab: Lab, job_id: str, timeout: float = JOB_TIMEOUT_S) -> Job:
    return lab.drover.wait(job_id, timeout=timeout)


@pytest.fixture
def workers_back(lab: Lab) -> Iterator[None]:
    """Whatever a case kills, every worker, libvirtd, link and Redis is back afterwards."""
    yield
    for name in lab.hosts():
        control.set_link(name, True)
        control.thaw_libvirtd(name)
        control.thaw_worker(name)
        status = control.status()["hosts"][name]
        if not status["worker_alive"]:
            control.restart_worker(name)
    lab.status = control.status()


@pytest.fixture
def fault_config(lab_config_file: Path) -> Callable[[str], None]:
    """Append TOML to the lab config for one case (workers re-read it); restored after."""
    original = lab_config_file.read_text()

    def add(extra: str) -> None:
        replace_config(lab_config_file, original + "\n" + extra + "\n")

    return add


def settle_jobs(lab: Lab) -> None:
    """Abort whatever a failed case left running, and wait until every job has ended."""
    store, evacuations = lab.drover.store, lab.drover.evacuations
    for job_id in evacuations.active_ids() + store.active_ids():
        with contextlib.suppress(SubmitError, JobNotFound):
            lab.drover.abort(job_id)

    def ended() -> bool:
        """No job live; a post-copy (which no abort stops) has its cap lifted on every look,
        so a case that failed with one held at 1 MiB/s does not hold up the next cases."""
        live = store.active_ids()
        for job_id in live:
            with contextlib.suppress(JobNotFound):
                job = store.get(job_id)
                if job.postcopy_since is not None and job.spec.src in lab.status["hosts"]:
                    lift_postcopy_cap(lab.uri(job.spec.src), job.spec.domain, SETTLE_MIB)
        return not live

    try:
        wait_for(ended, JOB_TIMEOUT_S, "every job to end")
    except AssertionError:
        left = {i: store.state(i) for i in store.active_ids()}
        raise AssertionError(f"jobs still live after {JOB_TIMEOUT_S:.0f}s: {left}") from None
    wait_for(lambda: not evacuations.active_ids(), JOB_TIMEOUT_S, "every evacuation to end")


@pytest.fixture
def dirty_home(lab: Lab) -> Iterator[None]:
    """dirty-1 running on lab1 before the case, paused on lab1 after it."""
    settle_jobs(lab)
    lab.revive_lost("dirty-1")
    lab.home("dirty-1")
    lab.set_paused("dirty-1", False)
    yield
    settle_jobs(lab)
    lab.revive_lost("dirty-1")
    lab.home("dirty-1")
    lab.set_paused("dirty-1", True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TALLY.cases:
        terminalreporter.write_line(
            f"fault suite: {TALLY.cases} cases, {TALLY.checks} invariant checks, "
            f"outcomes {sorted(TALLY.outcomes.values())}"
        )
