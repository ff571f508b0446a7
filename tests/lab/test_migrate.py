"""Live migration through drover on the real lab, checked through libvirt on both hosts."""

from __future__ import annotations

from collections import Counter

import libvirt
import pytest

from jobs.phases import PHASE_ORDER
from tests.support.lab_fixtures import Lab

pytestmark = pytest.mark.lab

CONTRACT = {"ts", "event", "job_id", "domain", "src", "dst", "phase", "host"}


def test_idle_guest_goes_there_and_back(lab: Lab) -> None:
    lab.home("idle-1")
    job = lab.migrate("idle-1", "lab1", "lab2")
    assert job.state.value == "succeeded", job.reason
    there, here = lab.view("lab2", "idle-1"), lab.view("lab1", "idle-1")
    assert there.active and there.state == libvirt.VIR_DOMAIN_RUNNING
    assert not there.persistent  # no --persistent: transient on the destination
    assert here.exists and not here.active and here.persistent  # source keeps its config

    # Every phase ran, in order, on the host that owns it, and ended without error.
    assert list(job.phases) == [p.value for p in PHASE_ORDER]
    owners = [job.phases[p.value].host for p in PHASE_ORDER]
    assert owners == ["lab1", "lab2", "lab1", "lab2", "lab1"]
    assert all(r.ended is not None and r.error is None for r in job.phases.values())
    assert [t.state.value for t in job.transitions] == [
        "queued",
        "preflight",
        "prepared",
        "migrating",
        "finishing",
        "succeeded",
    ]
    assert job.source.memory_mib == 64 and (job.result.migration_ms or 0) > 0

    back = lab.migrate("idle-1", "lab2", "lab1")
    assert back.state.value == "succeeded", back.reason
    assert lab.view("lab1", "idle-1").active and lab.view("lab1", "idle-1").persistent
    assert not lab.view("lab2", "idle-1").exists


def test_events_cover_every_phase_with_the_contract_keys(lab: Lab) -> None:
    lab.home("idle-1")
    job = lab.migrate("idle-1", "lab1", "lab2")
    assert job.state.value == "succeeded", job.reason
    events = list(lab.drover.events(job.id))
    assert all(ev.keys() >= CONTRACT for ev in events)
    assert {ev["job_id"] for ev in events} == {job.id}
    started = [(ev["phase"], ev["host"]) for ev in events if ev["event"] == "phase.started"]
    assert started == [
        ("source_preflight", "lab1"),
        ("destination_prepare", "lab2"),
        ("perform", "lab1"),
        ("finish", "lab2"),
        ("confirm", "lab1"),
    ]
    finished = Counter(ev["phase"] for ev in events if ev["event"] == "phase.finished")
    assert finished == Counter(p.value for p in PHASE_ORDER)
    states = [ev["state"] for ev in events if ev["event"] in ("job.state", "job.queued")]
    assert states == ["queued", "preflight", "prepared", "migrating", "finishing", "succeeded"]
    lab.home("idle-1")


def test_dirty_guest_converges_with_auto_converge_and_reports_progress(
    lab: Lab, dirty_running: None
) -> None:
    # The manual policy: auto-converge alone does it (the default policy would switch to
    # post-copy at the first pass's end, tests/lab/test_convergence.py).
    job = lab.migrate(
        "dirty-1", "lab1", "lab2", auto_converge=True, bandwidth_mib=128, policy="manual"
    )
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on("dirty-1") == ["lab2"]
    progress = [ev for ev in lab.drover.events(job.id) if ev["event"] == "migration.progress"]
    transfer = [ev for ev in progress if ev["stage"] == "transfer"]
    assert transfer, "no progress sample with libvirt's transfer figures"
    assert all(ev["data_total"] >= 128 * 1024 * 1024 for ev in transfer)
    assert any(ev["data_processed"] > 0 and ev["memory_bandwidth"] > 0 for ev in transfer)
    # The stages only move forward: a switch-over is reported once the transfer is over, not
    # whenever a busy libvirtd answers late in the middle of it.
    stages = [ev["stage"] for ev in progress]
    assert stages == sorted(stages, key=["setup", "transfer", "completing"].index), stages
    # At least one report a second while perform ran.
    perform = job.phases["perform"]
    assert perform.ended is not None
    span = (perform.ended - perform.started).total_seconds()
    assert len(progress) >= int(span) - 1
