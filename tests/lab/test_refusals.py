"""Refused migrations: the VM is untouched and the job failed with a reason to act on."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.control import LAB_HOST_MEMORY_MIB
from tests.support.lab_fixtures import Lab, replace_config

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
