"""Busy guests land on their own: the migration policy's decisions on real hosts.

dirty-1 rewrites 64 MiB all the time, faster than the capped link copies it: plain pre-copy
never finishes (tests/lab/test_modes.py shows the timer-driven ways out). Here the policy
judges libvirt's statistics and acts, and libvirt on both hosts says where the guest ended.
"""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from tests.support.lab_fixtures import Lab, wait_for

pytestmark = pytest.mark.lab


def steps(lab: Lab, job_id: str) -> list[dict[str, Any]]:
    return [e for e in lab.drover.events(job_id) if e["event"] == "policy.step"]


def landed_running_on_lab2(lab: Lab) -> None:
    assert lab.running_on("dirty-1") == ["lab2"]
    assert lab.view("lab2", "dirty-1").state == libvirt.VIR_DOMAIN_RUNNING  # not paused
    assert not lab.view("lab1", "dirty-1").active


def test_the_default_policy_switches_to_postcopy_after_the_first_pass(
    lab: Lab, dirty_running: None
) -> None:
    job = lab.migrate("dirty-1", "lab1", "lab2", bandwidth_mib=32)
    assert job.state.value == "succeeded", job.reason
    landed_running_on_lab2(lab)
    acted = [e for e in steps(lab, job.id) if e["action"] != "set_downtime"]
    assert [(e["action"], e["trigger"], e["done"]) for e in acted] == [
        ("postcopy", "not_converging", True)
    ]
    switch = acted[0]
    # judged at the first pass's end, from libvirt's figures: what it dirtied against the link
    assert switch["iteration"] == 2
    assert switch["dirty_mib_s"] >= 0.9 * switch["transfer_mib_s"] > 0
    assert any(s.startswith("raise_downtime:") for s in switch["skipped"])
    assert job.policy is not None and job.policy.name == "default"
    assert job.policy.sources["bandwidth_mib"] == "flag --bandwidth"
    assert job.postcopy_since is not None  # and so an abort is refused from then on


def test_a_policy_without_postcopy_throttles_then_suspends_and_says_so(
    lab: Lab, dirty_running: None
) -> None:
    job = lab.migrate("dirty-1", "lab1", "lab2", bandwidth_mib=64, policy="no-postcopy")
    assert job.state.value == "succeeded", job.reason
    landed_running_on_lab2(lab)
    acted = [e["action"] for e in steps(lab, job.id) if e["action"] != "set_downtime"]
    assert "postcopy" not in acted
    # auto-converge may land it by itself at 64 MiB/s; if not, the suspend is named
    assert acted in (["throttle"], ["throttle", "suspend"]), acted
    assert job.postcopy_since is None
    assert job.policy is not None and job.policy.values.allow_postcopy is False


def test_the_manual_policy_never_acts_on_its_own(lab: Lab, dirty_running: None) -> None:
    job_id = lab.drover.submit(
        domain="dirty-1", src="lab1", dst="lab2", live=True, bandwidth_mib=64, policy="manual"
    )
    d = lab.drover

    def said_none_left() -> bool:
        return any(e["action"] == "none_left" for e in steps(lab, job_id))

    try:
        wait_for(said_none_left, 60, "the policy to say it has no action left")
        assert d.job(job_id).state.value == "migrating"
        # still pre-copy: the guest runs on lab1 (lab2 holds only the paused incoming copy)
        assert lab.view("lab1", "dirty-1").state == libvirt.VIR_DOMAIN_RUNNING
        assert lab.view("lab2", "dirty-1").state == libvirt.VIR_DOMAIN_PAUSED
    finally:
        d.abort(job_id)
    job = d.wait(job_id, timeout=60)
    assert job.state.value == "cancelled", job.reason
    assert lab.running_on("dirty-1") == ["lab1"]
    assert lab.view("lab1", "dirty-1").state == libvirt.VIR_DOMAIN_RUNNING
