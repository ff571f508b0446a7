"""Migration policy precedence on real hosts: flag over --policy over the domain's libvirt
metadata over its host's policy over its host group's policy over `default`.

Each migration is real: the effective policy the source worker recorded on the job names the
layer each value came from, the call it made carries those values, libvirt on both hosts shows
the guest where it should be, and (for a busy guest held in pre-copy) the source's QEMU, asked
through libvirt, runs the migration at the bandwidth the winning layer set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from config.settings import load_settings
from jobs.model import Job
from producer.api import Drover
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, replace_config, wait_for
from worker.domain_metadata import PLACEMENT_NS

pytestmark = pytest.mark.lab

MIB = 1024 * 1024
HOLD_CAP_MIB = 8
POLICIES = """
[policies.labhost]
bandwidth_mib = 300
max_downtime_ms = 250

[policies.labgroup]
bandwidth_mib = 250
progress_timeout_s = 45

[policies.meta]
bandwidth_mib = 200
progress_timeout_s = 40

[policies.fast]
bandwidth_mib = 100
downtime_steps = 4

# Held in pre-copy (no action of its own) at a low cap, post-copy allowed with its own cap.
[policies.hold]
bandwidth_mib = 8
postcopy_bandwidth_mib = 3
actions = []

# Raises the downtime on its schedule (3 s, 6 s, ... 60 s) at each stall, nothing else: dirty-1
# rewrites its 64 MiB all the time, about 8 s of transfer at 8 MiB/s, so that the policy's
# first step (3 s) never lets it converge and a raise to 9 s would.
[policies.stepped]
bandwidth_mib = 8
max_downtime_ms = 60000
downtime_steps = 20
progress_timeout_s = 2
actions = ["raise_downtime"]

[groups.racks]
policy = "labgroup"
"""
OPERATOR_DOWNTIME_MS = 777
STEPPED_FIRST_MS = 3000
FROM_TOML = "(drover.toml)"


@pytest.fixture
def policies(lab: Lab, lab_config_file: Path) -> Iterator[Drover]:
    """lab1 with host policy `labhost`, lab2 in group `racks` (policy `labgroup`); a producer
    that reads this registry. Restored (and metadata cleared) afterwards."""
    for guest in ("idle-1", "dirty-1"):
        lab.home(guest)
    text = lab_config_file.read_text()
    text = text.replace("[hosts.lab1]\n", '[hosts.lab1]\npolicy = "labhost"\n')
    text = text.replace("[hosts.lab2]\n", '[hosts.lab2]\ngroup = "racks"\n')
    replace_config(lab_config_file, text + POLICIES)
    yield Drover(load_settings(lab_config_file))
    for guest in ("idle-1", "dirty-1"):
        set_metadata_policy(lab, guest, None)
    lab.home("idle-1")  # the registry file itself is restored by lab_config_file


def set_metadata_policy(lab: Lab, domain: str, policy: str | None) -> None:
    """drover's metadata element on `domain` wherever it runs (as `virsh metadata` sets it)."""
    for host in lab.running_on(domain):
        conn = libvirt.open(lab.uri(host))
        try:
            conn.lookupByName(domain).setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                None if policy is None else f'<placement policy="{policy}"/>',
                None if policy is None else "drover",
                PLACEMENT_NS,
                libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG,
            )
        finally:
            conn.close()


def migrated(lab: Lab, drover: Drover, src: str, dst: str, **opts: Any) -> Job:
    """A real migration of idle-1, checked through libvirt on both hosts."""
    job_id = drover.submit(domain="idle-1", src=src, dst=dst, live=True, **opts)
    job = drover.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on("idle-1") == [dst]
    assert not lab.view(src, "idle-1").active
    return job


def bandwidth_called(drover: Drover, job: Job) -> int | None:
    started = [e for e in drover.events(job.id) if e["event"] == "migration.started"]
    assert len(started) == 1, started
    value = started[0]["call"]["params"].get(libvirt.VIR_MIGRATE_PARAM_BANDWIDTH)
    return None if value is None else int(value)


def test_precedence_on_real_migrations(lab: Lab, policies: Drover) -> None:
    # The host's policy (lab1: labhost), below it `default`.
    job = migrated(lab, policies, "lab1", "lab2")
    assert job.policy is not None and job.policy.name == "labhost"
    assert job.policy.values.bandwidth_mib == 300 == bandwidth_called(policies, job)
    assert job.policy.sources["bandwidth_mib"] == f"host lab1: policy labhost {FROM_TOML}"
    assert job.policy.sources["allow_postcopy"] == "default (shipped)"

    # lab2 names no policy: its group's (racks: labgroup).
    job = migrated(lab, policies, "lab2", "lab1")
    assert job.policy is not None and job.policy.name == "labgroup"
    assert job.policy.values.bandwidth_mib == 250 == bandwidth_called(policies, job)
    assert job.policy.sources["bandwidth_mib"] == f"group racks: policy labgroup {FROM_TOML}"

    # The domain's metadata over its host's policy; what it leaves out stays the host's.
    set_metadata_policy(lab, "idle-1", "meta")
    job = migrated(lab, policies, "lab1", "lab2")
    assert job.policy is not None and job.policy.name == "meta"
    assert job.policy.values.bandwidth_mib == 200 == bandwidth_called(policies, job)
    assert job.policy.sources["bandwidth_mib"] == f"domain metadata: policy meta {FROM_TOML}"
    assert job.policy.values.max_downtime_ms == 250
    assert job.policy.sources["max_downtime_ms"] == f"host lab1: policy labhost {FROM_TOML}"

    # --policy over the metadata (which moved with the guest), the job's flag over both.
    job = migrated(lab, policies, "lab2", "lab1", policy="fast", bandwidth_mib=50)
    assert job.policy is not None and job.policy.name == "fast"
    assert job.policy.values.bandwidth_mib == 50 == bandwidth_called(policies, job)
    assert job.policy.sources["bandwidth_mib"] == "flag --bandwidth"
    assert job.policy.sources["downtime_steps"] == f"--policy: policy fast {FROM_TOML}"
    assert job.policy.values.progress_timeout_s == 40
    assert job.policy.sources["progress_timeout_s"] == f"domain metadata: policy meta {FROM_TOML}"
    assert job.policy.sources["max_downtime_ms"] == "default (shipped)"  # lab2's group: unset


def qemu_parameters(lab: Lab, host: str, domain: str) -> dict[str, Any]:
    """QEMU's migration parameters of `domain` on `host`, asked through libvirt."""
    conn = libvirt.open(lab.uri(host))
    try:
        dom = conn.lookupByName(domain)
        reply = libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-migrate-parameters"}', 0)
    finally:
        conn.close()
    result: dict[str, Any] = json.loads(reply)["return"]
    return result


def test_the_metadata_policy_is_what_qemu_runs_with(
    lab: Lab, policies: Drover, dirty_running: None
) -> None:
    set_metadata_policy(lab, "dirty-1", "hold")
    job_id = policies.submit(domain="dirty-1", src="lab1", dst="lab2", live=True)
    try:
        wait_for(
            lambda: policies.job(job_id).state.value == "migrating",
            JOB_TIMEOUT_S,
            "dirty-1 migrating",
        )
        wait_for(
            lambda: (
                qemu_parameters(lab, "lab1", "dirty-1").get("max-bandwidth") == HOLD_CAP_MIB * MIB
            ),
            30,
            "QEMU on lab1 migrating dirty-1 at the metadata policy's 8 MiB/s",
        )
        params = qemu_parameters(lab, "lab1", "dirty-1")
        assert params.get("max-postcopy-bandwidth") == 3 * MIB, params
        job = policies.job(job_id)
        assert job.policy is not None and job.policy.name == "hold"
        assert job.policy.sources["bandwidth_mib"] == f"domain metadata: policy hold {FROM_TOML}"
        assert job.policy.values.actions == ()
    finally:
        aborted_home(lab, policies, job_id)


def aborted_home(lab: Lab, drover: Drover, job_id: str) -> None:
    """Abort dirty-1's migration: cancelled, and libvirt shows it on lab1 alone."""
    drover.abort(job_id)
    job = drover.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert job.state.value == "cancelled", job.reason
    assert lab.running_on("dirty-1") == ["lab1"]
    assert not lab.view("lab2", "dirty-1").exists


def dirty_rate_measured(lab: Lab, domain: str) -> float | None:
    conn = libvirt.open(lab.uri("lab1"))
    try:
        dom = conn.lookupByName(domain)
        ((_, stats),) = conn.domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_DIRTYRATE)
    finally:
        conn.close()
    if stats.get("dirtyrate.calc_status") != libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED:
        return None
    return float(stats["dirtyrate.megabytes_per_second"])


def test_the_dry_run_estimates_with_the_policy_and_the_measured_dirty_rate(
    lab: Lab, policies: Drover, dirty_running: None
) -> None:
    conn = libvirt.open(lab.uri("lab1"))
    try:
        conn.lookupByName("dirty-1").startDirtyRateCalc(1, 0)  # virsh domdirtyrate-calc
    finally:
        conn.close()
    wait_for(lambda: dirty_rate_measured(lab, "dirty-1") is not None, 30, "dirty rate measured")
    rate = dirty_rate_measured(lab, "dirty-1")
    assert rate is not None and rate > HOLD_CAP_MIB
    spec = policies.evacuation_spec(host="lab1", to=["lab2", "lab3"], dry_run=True, policy="hold")
    ev = policies.wait_evacuation(policies.evacuate(spec), JOB_TIMEOUT_S)
    assert ev.state.value == "planned", ev.reason
    plan = {p.domain: p for p in ev.plan or []}
    startup = policies.settings.tunables.estimate_startup_s
    busy, idle = plan["dirty-1"], plan["idle-1"]
    assert busy.policy == idle.policy == "hold"
    assert busy.estimate_s == round(startup + busy.memory_mib / HOLD_CAP_MIB, 1)
    assert busy.convergence is not None
    assert busy.convergence.startswith("will not converge: policy hold takes no action")
    assert f"copied at {HOLD_CAP_MIB} MiB/s" in busy.convergence
    assert idle.convergence is None  # no calculation ran for it
    assert lab.running_on("dirty-1") == ["lab1"]  # a dry run moves nothing


def policy_steps(drover: Drover, job_id: str) -> list[dict[str, Any]]:
    return [e for e in drover.events(job_id) if e["event"] == "policy.step"]


def max_downtime(lab: Lab, host: str, domain: str) -> int:
    conn = libvirt.open(lab.uri(host))
    try:
        return int(conn.lookupByName(domain).migrateGetMaxDowntime(0))
    finally:
        conn.close()


def test_the_operators_downtime_stands_against_the_policys_later_steps(
    lab: Lab, policies: Drover, dirty_running: None
) -> None:
    """After `drover tune --max-downtime`, the policy's raise_downtime steps are said and not
    made: libvirt keeps the operator's figure (probe F3: the policy's step overwrote it)."""
    job_id = policies.submit(domain="dirty-1", src="lab1", dst="lab2", live=True, policy="stepped")
    try:
        wait_for(
            lambda: any(s["action"] == "set_downtime" for s in policy_steps(policies, job_id)),
            JOB_TIMEOUT_S,
            "the policy's first downtime step",
        )
        assert max_downtime(lab, "lab1", "dirty-1") == STEPPED_FIRST_MS
        assert "max_downtime_ms=777" in policies.tune(job_id, max_downtime_ms=OPERATOR_DOWNTIME_MS)

        def held() -> list[dict[str, Any]]:
            return [
                s
                for s in policy_steps(policies, job_id)
                if s["action"] == "raise_downtime" and s.get("held_by") == "operator"
            ]

        wait_for(lambda: held(), JOB_TIMEOUT_S, "a raise of the policy's after the tune")
        step = held()[0]
        assert step["done"] is False and step["operator_downtime_ms"] == OPERATOR_DOWNTIME_MS
        assert step["downtime_ms"] > STEPPED_FIRST_MS
        assert max_downtime(lab, "lab1", "dirty-1") == OPERATOR_DOWNTIME_MS
        made = [s for s in policy_steps(policies, job_id) if s.get("by") == "policy" and s["done"]]
        assert [s["action"] for s in made] == ["set_downtime"], made  # none made after it
    finally:
        aborted_home(lab, policies, job_id)
