"""Refused migrations: the VM is untouched and the job failed with a reason to act on."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from jobs.keys import DISABLED_HOSTS, job_key
from jobs.store import reservations_key
from lab.control import LAB_HOST_MEMORY_MIB
from lab.guests import DIRTY_MEMORY_MIB, IDLE_MEMORY_MIB
from lab.layout import LabLayout
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, replace_config, wait_for
from worker.ledger import LEDGER_FILE

pytestmark = pytest.mark.lab


def test_unknown_domain_fails_in_preflight(lab: Lab) -> None:
    job = lab.migrate("no-such-vm", "lab1", "lab2")
    assert job.state.value == "failed"
    assert job.reason == "no-such-vm is not defined on lab1"
    assert job.phases["source_preflight"].error == job.reason
    assert "perform" not in job.phases


@pytest.fixture
def lab2_memory_limited(lab: Lab) -> Iterator[None]:
    """Declare lab2 as having room for only 40 MiB of guests (workers re-read the file)."""
    path = Path(lab.config)
    original = path.read_text()
    block = f"[hosts.lab2.limits]\nmemory_mib = {LAB_HOST_MEMORY_MIB}\n"
    assert block in original
    replace_config(path, original.replace(block, "[hosts.lab2.limits]\nmemory_mib = 40\n"))
    try:
        yield
    finally:
        replace_config(path, original)


def test_destination_short_of_memory_leaves_vm_running_on_source(
    lab: Lab, lab2_memory_limited: None
) -> None:
    lab.home("idle-1")
    job = lab.migrate("idle-1", "lab1", "lab2")
    assert job.state.value == "failed"
    assert job.reason == "lab2 has 40 MiB free, idle-1 needs 64 MiB"
    assert job.phases["destination_prepare"].error == job.reason
    assert "perform" not in job.phases
    assert lab.running_on("idle-1") == ["lab1"]
    assert not lab.view("lab2", "idle-1").exists
    assert lab.drover.store.reserved_mib("lab2") == 0
    failed = [e for e in lab.drover.events(job.id) if e.get("state") == "failed"]
    assert failed and re.search("40 MiB free", failed[-1]["reason"])


# How long the first job waits in perform (the fault suite's hook) with its memory booked.
HELD_IN_PERFORM_S = 15


@pytest.mark.parametrize("forged_state", [None, "succeeded"], ids=["deleted", "and-ended"])
def test_a_booking_deleted_from_redis_does_not_let_a_second_guest_in(
    lab: Lab, forged_state: str | None
) -> None:
    """lab2 has room for dirty-1 or idle-1, not both. While dirty-1's job holds its booking
    (in perform), someone with the Redis password deletes that booking (and, the attack
    probe's variant, writes the job `succeeded` meanwhile): idle-1's job must still be
    refused, as lab2's worker also booked the memory in its own ledger, which holds until
    lab2 releases it; and dirty-1's job still ends as libvirt shows it."""
    lab.home("idle-1")
    lab.home("dirty-1")
    path = Path(lab.config)
    original = path.read_text()
    block = f"[hosts.lab2.limits]\nmemory_mib = {LAB_HOST_MEMORY_MIB}\n"
    assert block in original
    limit = DIRTY_MEMORY_MIB + IDLE_MEMORY_MIB - 1
    limited = original.replace(block, f"[hosts.lab2.limits]\nmemory_mib = {limit}\n")
    replace_config(path, f"{limited}\n[faults.phase_delays]\nperform = {HELD_IN_PERFORM_S}\n")
    d = lab.drover
    try:
        first = d.submit(domain="dirty-1", src="lab1", dst="lab2", live=True)
        booking = reservations_key("lab2")
        wait_for(lambda: "perform" in d.job(first).phases, JOB_TIMEOUT_S, "dirty-1 in perform")
        assert d.store.r.hget(booking, first) == str(DIRTY_MEMORY_MIB)
        d.store.r.hdel(booking, first)  # the forger's move
        real = d.store.r.hget(job_key(first), "state")
        if forged_state is not None:
            d.store.r.hset(job_key(first), "state", forged_state)
        try:
            second = lab.migrate("idle-1", "lab1", "lab2")
        finally:
            d.store.r.hset(job_key(first), "state", str(real))
        room = limit - DIRTY_MEMORY_MIB
        assert second.state.value == "failed"
        assert second.reason == f"lab2 has {room} MiB free, idle-1 needs {IDLE_MEMORY_MIB} MiB"
        assert "perform" not in second.phases
        assert lab.running_on("idle-1") == ["lab1"]
        assert not lab.view("lab2", "idle-1").exists
        done = d.wait(first, timeout=JOB_TIMEOUT_S)
        assert done.state.value == "succeeded", done.reason
        assert lab.view("lab2", "dirty-1").active and not lab.view("lab1", "dirty-1").active
    finally:
        replace_config(path, original)
        lab.home("dirty-1")


def lab2_holds_its_maintenance() -> bool:
    """lab2's worker has kept, in its own ledger, that it saw lab2 disabled."""
    path = LabLayout.from_env().host(2).dir / "lib" / "drover" / LEDGER_FILE
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("SELECT 1 FROM maintenance WHERE host = 'lab2'").fetchone() is not None


@pytest.fixture
def lab2_enabled_after(lab: Lab) -> Iterator[None]:
    yield
    lab.drover.set_host_enabled("lab2", True)
    lab.home("idle-1")


def test_a_maintenance_entry_deleted_by_hand_lands_no_guest_on_the_host(
    lab: Lab, lab2_enabled_after: None
) -> None:
    """lab2 disabled by the operator, its worker has seen it; the entry deleted from Redis
    (the attacker probe): a migration to lab2 is refused by lab2's worker, idle-1 stays on
    lab1, until the operator's signed `drover host enable lab2`."""
    lab.home("idle-1")
    d = lab.drover
    d.set_host_enabled("lab2", False, "firmware update")
    wait_for(lab2_holds_its_maintenance, JOB_TIMEOUT_S, "lab2's worker to see its maintenance")
    d.store.r.hdel(DISABLED_HOSTS, "lab2")  # the attacker, with the producer's password

    job = lab.migrate("idle-1", "lab1", "lab2")
    assert job.state.value == "failed", job.reason
    assert job.reason is not None and "lab2 is disabled for maintenance" in job.reason
    assert "without a signed `drover host enable lab2`" in job.reason
    assert lab.running_on("idle-1") == ["lab1"] and not lab.view("lab2", "idle-1").exists

    d.set_host_enabled("lab2", True)  # the operator's, signed
    job = lab.migrate("idle-1", "lab1", "lab2")
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on("idle-1") == ["lab2"]
