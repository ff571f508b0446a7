"""Drains with a single migration's options, and compression methods, on the real lab.

Every claim is checked through libvirt on both hosts: where the guest runs, what is left of
it on the drained host, its copied disk on the destination, and the destination's completed
job statistics (libvirt reports `compression_cache` only when QEMU ran xbzrle, and its value
is the cache the job asked for). The lab's libvirt is 9.0.0: zlib and zstd (libvirt >= 9.4)
must be refused by the worker before anything moves, with the guest untouched.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import libvirt
import pytest

from jobs.evacuation import Evacuation
from lab.layout import LabLayout
from tests.lab.test_schedule import (
    AHEAD_S,
    BEAT_START_TIMEOUT_S,
    EVACUATION_TIMEOUT_S,
    FIRE_TIMEOUT_S,
    Beat,
    beats,
    evacuations_from,
)
from tests.support.cli import run_drover
from tests.support.disk_guest import undefine
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for
from tests.support.tls_files import Certs

pytestmark = pytest.mark.lab
_ = beats  # the fixture, imported for the schedule test

MIB = 1024 * 1024
DISK_GUEST = "draindisk-1"  # not test_modes.py's disk-1: images outlive a failed test
IMAGES = "/var/lib/libvirt/images"  # the lab registry's storage_dirs (the default)
DISK_MIB = 16


def completed_stats(lab: Lab, host: str, domain: str) -> dict[str, Any]:
    """The last migration's statistics as `host`'s libvirt keeps them (the destination)."""
    conn = libvirt.open(lab.uri(host))
    try:
        stats: dict[str, Any] = conn.lookupByName(domain).jobStats(
            libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
        )
        return stats
    finally:
        conn.close()


def started_call(lab: Lab, job_id: str) -> dict[str, Any]:
    (event,) = [e for e in lab.drover.events(job_id) if e["event"] == "migration.started"]
    call: dict[str, Any] = event["call"]
    return call


def host_index(name: str) -> int:
    return int(name.removeprefix("lab"))


def image_on(lab: Lab, host: str) -> Path:
    """Where the guest's image is on `host`, seen from the root namespace (the test lab's own
    directory, not the environment's default lab)."""
    layout = LabLayout(lab_id=0, dir=Path(lab.status["config"]).parent).host(host_index(host))
    return layout.own_dir("/var/lib/libvirt") / "images" / f"{DISK_GUEST}.qcow2"


def disk_guest_xml() -> str:
    return f"""<domain type='qemu'>
  <name>{DISK_GUEST}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{IMAGES}/{DISK_GUEST}.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def remove_disk_guest(lab: Lab) -> None:
    for host in lab.hosts():
        undefine(lab, host, DISK_GUEST)
        image_on(lab, host).unlink(missing_ok=True)


@pytest.fixture
def disk_guest_on_lab2(lab: Lab) -> Iterator[None]:
    """An idle guest with a local qcow2 disk (made with qemu-img in lab2's storage dir),
    running on lab2 alone with idle-3; everything as before afterwards."""
    lab.all_home()
    remove_disk_guest(lab)
    for host in lab.hosts():
        image_on(lab, host).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image_on(lab, "lab2")), f"{DISK_MIB}M"],
        check=True,
        timeout=30,
    )
    conn = libvirt.open(lab.uri("lab2"))
    try:
        conn.defineXML(disk_guest_xml()).create()
    finally:
        conn.close()
    job = lab.migrate("idle-3", "lab1", "lab2")
    assert job.state.value == "succeeded", job.reason
    yield
    remove_disk_guest(lab)
    lab.all_home()


def evacuation_of(lab: Lab, stdout: str) -> Evacuation:
    import json

    return Evacuation.model_validate(json.loads(stdout))


def test_evacuate_with_copy_storage_parallel_and_compression(
    lab: Lab, disk_guest_on_lab2: None
) -> None:
    done = run_drover(
        lab.config,
        *("evacuate", "lab2", "--to", "lab3", "--copy-storage", "all", "--parallel", "2"),
        *("--compressed", "--comp-methods", "xbzrle", "--comp-xbzrle-cache", "16"),
        *("--wait", "--timeout", str(JOB_TIMEOUT_S), "--json"),
    )
    assert done.returncode == 0, done.stderr
    ev = evacuation_of(lab, done.stdout)
    assert ev.state.value == "drained", ev.reason
    assert sorted(ev.children) == [DISK_GUEST, "idle-3"]
    disk_plan = next(p for p in ev.plan or [] if p.domain == DISK_GUEST)
    assert disk_plan.local_disks == 1 and disk_plan.destination == "lab3"

    # idle-3 came to lab2 as a transient guest (a plain live migration): it stays one
    for domain, persistent in ((DISK_GUEST, True), ("idle-3", False)):
        # libvirt on both hosts: running on lab3 as it was on lab2, nothing left on lab2
        there, here = lab.view("lab3", domain), lab.view("lab2", domain)
        assert there.active and not here.exists, (domain, there, here)
        assert there.persistent is persistent, (domain, there)
        child = lab.drover.job(ev.children[domain])
        assert child.state.value == "succeeded", child.reason
        assert child.spec.parallel == 2 and child.spec.compressed
        assert child.spec.compression is not None
        assert child.spec.compression.xbzrle_cache_mib == 16
        call = started_call(lab, child.id)
        assert {"VIR_MIGRATE_PARALLEL", "VIR_MIGRATE_COMPRESSED"} <= set(call["flags"])
        assert call["params"]["parallel.connections"] == 2
        assert call["params"]["compression"] == ["xbzrle"]
        # QEMU ran xbzrle with the cache the drain asked for (libvirt's own figures)
        assert completed_stats(lab, "lab3", domain)["compression_cache"] == 16 * MIB

    disk_child = lab.drover.job(ev.children[DISK_GUEST])
    assert disk_child.spec.copy_storage is not None
    assert disk_child.spec.copy_storage.value == "all"
    assert "VIR_MIGRATE_NON_SHARED_DISK" in started_call(lab, disk_child.id)["flags"]
    # the idle guest has no local disk: it was not asked to copy storage
    assert lab.drover.job(ev.children["idle-3"]).spec.copy_storage is None
    # the disk is on lab3, as lab3's libvirt sees it, and the guest uses it there
    conn = libvirt.open(lab.uri("lab3"))
    try:
        dom = conn.lookupByName(DISK_GUEST)
        assert f"{IMAGES}/{DISK_GUEST}.qcow2" in dom.XMLDesc(0)
        capacity = dom.blockInfo(f"{IMAGES}/{DISK_GUEST}.qcow2")[0]
        assert capacity == DISK_MIB * MIB
    finally:
        conn.close()
    assert image_on(lab, "lab3").exists()


def test_compression_methods_and_levels_are_used_by_qemu(lab: Lab) -> None:
    lab.all_home()
    try:
        job = lab.migrate(
            "idle-1",
            "lab1",
            "lab2",
            compression={"methods": ["xbzrle", "mt"], "xbzrle_cache_mib": 8, "mt_level": 1},
        )
        assert job.state.value == "succeeded", job.reason
        assert lab.view("lab2", "idle-1").active and not lab.view("lab1", "idle-1").active
        call = started_call(lab, job.id)
        assert "VIR_MIGRATE_COMPRESSED" in call["flags"]
        assert call["params"]["compression"] == ["xbzrle", "mt"]
        assert call["params"]["compression.mt.level"] == 1
        assert completed_stats(lab, "lab2", "idle-1")["compression_cache"] == 8 * MIB
    finally:
        lab.all_home()


def test_zlib_and_zstd_are_refused_by_the_worker_on_libvirt_9_0(lab: Lab) -> None:
    lab.all_home()
    for method in ("zlib", "zstd"):
        job = lab.migrate(
            "idle-2",
            "lab1",
            "lab2",
            parallel=2,
            compression={"methods": [method], f"{method}_level": 3},
        )
        assert job.state.value == "failed"
        assert job.reason is not None
        assert f"does not support compression method {method}" in job.reason, job.reason
        assert "libvirt 9.0.0" in job.reason and "9.4.0" in job.reason
        assert not [e for e in lab.drover.events(job.id) if e["event"] == "migration.started"]
        # untouched: still running on lab1, nothing of it on lab2
        assert lab.view("lab1", "idle-2").active and not lab.view("lab2", "idle-2").exists


def test_bad_drain_options_are_refused_in_one_line(lab: Lab) -> None:
    for bad, says in (
        (("--comp-methods", "zlib"), "compression zlib needs parallel_connections >= 2"),
        (("--comp-methods", "lz4"), "--comp-methods"),
        (("--comp-zstd-level", "5"), "--comp-zstd-level needs zstd in --comp-methods"),
        (("--tunnelled", "--parallel", "2"), "--parallel cannot be tunnelled"),
        (("--copy-storage", "everything"), "--copy-storage"),
        (("--parallel", "1"), "parallel"),
    ):
        refused = run_drover(lab.config, "evacuate", "lab1", "--dry-run", *bad)
        line = refused.stderr.strip()
        assert refused.returncode == 2 and "\n" not in line and "Traceback" not in line, line
        assert says in line, line
    # nothing was disabled or queued: every host still takes guests
    assert all(h["state"] == "enabled" for h in lab.drover.hosts()), lab.drover.hosts()


def test_a_scheduled_drain_carries_the_options(lab: Lab, beats: list[Beat], tmp_path: Path) -> None:
    lab.all_home()
    job = lab.migrate("idle-4", "lab1", "lab2")
    assert job.state.value == "succeeded", job.reason
    schedule_id = None
    try:
        beats.append(Beat(lab, tmp_path / "beat.log"))
        beats[0].wait_started()
        wait_for(beats[0].holds_lock, BEAT_START_TIMEOUT_S, "the beat to take its lock")
        at = (datetime.now(UTC) + timedelta(seconds=AHEAD_S)).replace(microsecond=0).isoformat()
        added = run_drover(
            lab.config,
            *("schedule", "add", "evacuate", "lab2", "--at", at, "--to", "lab3"),
            *("--parallel", "2", "--compressed", "--comp-methods", "xbzrle"),
            *("--comp-xbzrle-cache", "32", "--copy-storage", "inc", "--json"),
        )
        assert added.returncode == 0, added.stderr
        import json

        sid = schedule_id = str(json.loads(added.stdout)["id"])
        wait_for(lambda: bool(evacuations_from(lab, sid)), AHEAD_S + FIRE_TIMEOUT_S, "firing")
        (evacuation_id,) = evacuations_from(lab, sid)
        ev = lab.drover.wait_evacuation(evacuation_id, EVACUATION_TIMEOUT_S)
        assert ev.state.value == "drained", ev.reason
        spec = ev.spec
        assert (spec.parallel, spec.compressed, spec.copy_storage) == (2, True, "inc")
        assert spec.compression is not None and spec.compression.xbzrle_cache_mib == 32
        child = lab.drover.job(ev.children["idle-4"])
        assert child.spec.parallel == 2 and child.spec.copy_storage is None  # no local disk
        assert lab.view("lab3", "idle-4").active and not lab.view("lab2", "idle-4").exists
        assert completed_stats(lab, "lab3", "idle-4")["compression_cache"] == 32 * MIB
    finally:
        for beat in beats:
            beat.stop()
        if schedule_id is not None:
            run_drover(lab.config, "schedule", "remove", schedule_id)
        lab.all_home()


def test_a_tls_drain_leaves_out_hosts_without_certificates(lab: Lab, tmp_path: Path) -> None:
    """This lab is up without --tls: no host has migration certificates, so a --tls drain
    places nothing (the dry run shows why) and nothing moves. lab1 itself lacks the CA its
    QEMU would check a destination with: said first (every child would be refused at its
    preflight); with that CA in place, the destinations' own lack is what is said."""
    lab.all_home()

    def dry_run() -> Evacuation:
        done = run_drover(
            lab.config, "evacuate", "lab1", "--tls", "--dry-run", "--timeout", "60", "--json"
        )
        ev = evacuation_of(lab, done.stdout)
        assert ev.state.value == "planned", ev.reason
        assert ev.plan and all(p.destination is None for p in ev.plan)
        return ev

    for p in dry_run().plan or []:
        assert p.reason is not None and "lab1: no QEMU migration TLS client" in p.reason
    ca = Path(lab.status["config"]).parent / "hosts/lab1/pki/qemu/ca-cert.pem"
    ca.parent.mkdir(parents=True, exist_ok=True)
    ca.write_text("placeholder: there, but no certificate\n")
    try:
        junk = dry_run().plan or []
        shutil.copy(Certs(tmp_path).dir / "ca-cert.pem", ca)
        plan = dry_run().plan or []
    finally:
        ca.unlink()
    for p in junk:
        assert p.reason is not None and "lab1: unusable QEMU migration TLS client" in p.reason
        assert "ca-cert.pem is not a PEM certificate" in p.reason
    for p in plan:
        assert p.reason is not None and "no QEMU migration TLS certificates" in p.reason
    assert lab.running_on("idle-1") == ["lab1"]


def qemu_on(lab: Lab, host: str, domain: str, command: str) -> Any:
    """A QMP query of `domain`'s QEMU on `host`, asked through its libvirtd."""
    import json

    import libvirt_qemu

    conn = libvirt.open(lab.uri(host))
    try:
        dom = conn.lookupByName(domain)
        reply = libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": command}), 0)
    finally:
        conn.close()
    return json.loads(reply)["return"]


def test_mt_compression_and_its_tuning_run_in_qemu(lab: Lab, dirty_running: None) -> None:
    """libvirt 9.0 reports no figures of mt compression, so QEMU itself is asked (through
    libvirt) while the busy guest's migration runs: the compress capability is on, with the
    job's level and threads. The migration is then aborted: the guest stays on lab1."""
    job_id = lab.drover.submit(
        domain="dirty-1",
        src="lab1",
        dst="lab2",
        live=True,
        policy="manual",  # no action of its own: pre-copy runs until the abort below
        bandwidth_mib=8,
        compression={"methods": ["mt"], "mt_level": 1, "mt_threads": 1, "mt_dthreads": 1},
    )

    def compressing() -> bool:
        if lab.drover.job(job_id).state.value != "migrating":
            return False
        try:
            caps = qemu_on(lab, "lab1", "dirty-1", "query-migrate-capabilities")
            status = qemu_on(lab, "lab1", "dirty-1", "query-migrate")
        except libvirt.libvirtError:
            return False
        on = {c["capability"]: c["state"] for c in caps}
        return bool(on.get("compress")) and status.get("status") == "active"

    try:
        wait_for(compressing, JOB_TIMEOUT_S, "QEMU on lab1 migrating dirty-1 with mt compression")
        params = qemu_on(lab, "lab1", "dirty-1", "query-migrate-parameters")
        assert params["compress-level"] == 1, params
        assert (params["compress-threads"], params["decompress-threads"]) == (1, 1), params
        call = started_call(lab, job_id)
        assert call["params"]["compression"] == ["mt"]
    finally:
        lab.drover.abort(job_id)
        job = lab.drover.wait(job_id, JOB_TIMEOUT_S)
    assert job.state.value in ("cancelled", "failed"), job.state
    assert lab.running_on("dirty-1") == ["lab1"] and not lab.view("lab2", "dirty-1").exists
