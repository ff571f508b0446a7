"""The operator's maximum downtime (`drover tune --max-downtime`) stands against the policy's
own downtime steps for the rest of the migration: they are said (`policy.step`, done false,
held_by operator) and not made. A tune made while the policy's first step is on its way to
libvirt is not overwritten by it (probe F3: it was, once in twelve); a libvirtd slow to answer
for one job never holds up another job's steps.

The domain records the limits it is given, in order (the seam between the worker and libvirt's
migration calls: libvirt's test driver has no migration). The lab shows the same on a real
migration (tests/lab/test_policies.py).
"""

from __future__ import annotations

import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from jobs.control import TuneRequest
from tests.support.job_locks import job_lock_held
from worker import job_locks
from worker.convergence import Decision
from worker.ledger import Ledger
from worker.migration_control import apply_tune
from worker.migration_watch import carry_out_step as watch_step

WAIT_S = 5.0
OPERATOR_MS = 777


class Guest:
    """A migrating guest's limits as libvirt takes them; a call may be held at a gate."""

    def __init__(self) -> None:
        self.downtimes: list[int] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def migrateSetMaxDowntime(self, value: int, flags: int = 0) -> int:  # libvirt's name
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT_S), "the call was never let through"
        self.downtimes.append(value)
        return 0


def step(action: str, downtime_ms: int) -> Decision:
    return Decision(action, "start", "the policy's", {"remaining_mib": 10}, downtime_ms=downtime_ms)  # type: ignore[arg-type]


LEDGER = Ledger(tempfile.mkdtemp(prefix="drover-ledger-"))  # this host's, for every test


def tuned(guest: Guest, job_id: str, downtime_ms: int = OPERATOR_MS) -> dict[str, int]:
    return apply_tune(guest, TuneRequest(max_downtime_ms=downtime_ms), job_id, LEDGER)  # type: ignore[arg-type]


def carry_out_step(guest: Guest, decision: Decision, job_id: str) -> bool:
    return watch_step(guest, decision, job_id, LEDGER)  # type: ignore[arg-type]


def job() -> str:
    return uuid.uuid4().hex


def policy_steps(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [log for log in logs if log["event"] == "policy.step"]


def test_without_a_tune_the_policys_steps_are_made() -> None:
    guest, job_id = Guest(), job()
    with capture_logs() as logs:
        assert carry_out_step(guest, step("set_downtime", 100), job_id)  # type: ignore[arg-type]
        assert carry_out_step(guest, step("raise_downtime", 200), job_id)  # type: ignore[arg-type]
    assert guest.downtimes == [100, 200]
    assert [s["done"] for s in policy_steps(logs)] == [True, True]


def test_after_the_operators_downtime_the_policys_steps_are_said_and_not_made() -> None:
    guest, job_id = Guest(), job()
    assert carry_out_step(guest, step("set_downtime", 100), job_id)  # type: ignore[arg-type]
    assert tuned(guest, job_id) == {"max_downtime_ms": OPERATOR_MS}
    with capture_logs() as logs:
        assert not carry_out_step(guest, step("raise_downtime", 200), job_id)  # type: ignore[arg-type]
    assert guest.downtimes == [100, OPERATOR_MS]  # libvirt still has the operator's
    (said,) = policy_steps(logs)
    assert said["action"] == "raise_downtime" and said["downtime_ms"] == 200
    assert said["done"] is False and said["held_by"] == "operator"
    assert said["operator_downtime_ms"] == OPERATOR_MS


def test_a_tune_racing_the_policys_first_step_is_not_overwritten() -> None:
    """The policy's first step is inside libvirt's call when the operator's tune comes: the
    tune waits for it and is made after it, so libvirt ends with the operator's figure."""
    guest, job_id = Guest(), job()
    guest.gate = threading.Event()
    policy = threading.Thread(
        target=carry_out_step, args=(guest, step("set_downtime", 100), job_id)
    )
    policy.start()
    assert guest.entered.wait(WAIT_S)
    operator = threading.Thread(target=tuned, args=(guest, job_id))
    operator.start()
    operator.join(0.2)
    assert operator.is_alive() and guest.downtimes == []  # it waits for the policy's call
    guest.gate.set()
    policy.join(WAIT_S)
    operator.join(WAIT_S)
    assert guest.downtimes == [100, OPERATOR_MS]


def test_a_policy_step_racing_the_tune_finds_it_and_holds() -> None:
    """The other order: the operator's call is inside libvirt when the policy's step comes;
    the step waits, then finds the operator's figure and is not made."""
    guest, job_id = Guest(), job()
    guest.gate = threading.Event()
    operator = threading.Thread(target=tuned, args=(guest, job_id))
    operator.start()
    assert guest.entered.wait(WAIT_S)
    done: list[bool] = []
    policy = threading.Thread(
        target=lambda: done.append(carry_out_step(guest, step("set_downtime", 100), job_id))  # type: ignore[arg-type]
    )
    policy.start()
    policy.join(0.2)
    assert policy.is_alive()
    guest.gate.set()
    operator.join(WAIT_S)
    policy.join(WAIT_S)
    assert guest.downtimes == [OPERATOR_MS] and done == [False]


def test_a_slow_libvirt_call_for_one_job_does_not_hold_up_another() -> None:
    slow, other = Guest(), Guest()
    slow.gate = threading.Event()
    stuck = threading.Thread(target=tuned, args=(slow, job()))
    stuck.start()
    assert slow.entered.wait(WAIT_S)
    try:
        assert carry_out_step(other, step("set_downtime", 100), job())  # type: ignore[arg-type]
        assert other.downtimes == [100]
    finally:
        slow.gate.set()
        stuck.join(WAIT_S)


def test_the_operators_downtime_is_one_jobs_only() -> None:
    guest, tuned_job, other_job = Guest(), job(), job()
    tuned(guest, tuned_job)
    assert carry_out_step(guest, step("raise_downtime", 200), other_job)  # type: ignore[arg-type]
    assert guest.downtimes == [OPERATOR_MS, 200]


def test_a_jobs_lock_in_use_is_never_dropped_for_room(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past job_locks.MAX_KEPT jobs the least recently used locks go, never one held: a second
    lock for the same job would let two of its steps in at once."""
    monkeypatch.setattr(job_locks, "MAX_KEPT", 2)
    busy, got_in = job(), threading.Event()

    def wait_for_it() -> None:
        with job_locks.held(busy):
            got_in.set()

    with job_lock_held(busy):
        for _ in range(5):  # more jobs than the map keeps
            with job_locks.held(job()):
                pass
        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        assert not got_in.wait(0.2)  # the same lock as the holder's: it waits
    assert got_in.wait(WAIT_S)
    waiter.join(WAIT_S)
    assert len(job_locks._locks) <= 2  # the room was made with the others


def test_locks_under_the_limit_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_locks, "MAX_KEPT", 50)
    monkeypatch.setattr(job_locks, "_locks", type(job_locks._locks)())
    for _ in range(10):
        with job_locks.held(job()):
            pass
    assert len(job_locks._locks) == 10


def test_the_operators_downtime_outlives_the_worker(tmp_path: Path) -> None:
    """Probe: the worker restarted mid-migration and the re-attached watch's policy raised
    the downtime from the operator's 777 ms to 9 s. The figure is in this host's ledger."""
    guest, job_id = Guest(), job()
    apply_tune(guest, TuneRequest(max_downtime_ms=OPERATOR_MS), job_id, Ledger(str(tmp_path)))  # type: ignore[arg-type]
    restarted = Ledger(str(tmp_path))  # the worker's next life, the same host
    assert not watch_step(guest, step("set_downtime", 3000), job_id, restarted)  # type: ignore[arg-type]
    assert guest.downtimes == [OPERATOR_MS]
