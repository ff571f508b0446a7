"""The six scenarios of libvirt's migration guide and virsh's options, through drover, on the
real lab; every outcome is checked through libvirt on both hosts."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from jobs.model import Job
from tests.support.disk_guest import disk_guest as local_disk_guest
from tests.support.disk_guest import undefine
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for
from tests.support.tls_files import Certs

pytestmark = pytest.mark.lab

# scenario -> (spec options, libvirt API, flags beyond VIR_MIGRATE_LIVE). The default policy
# allows post-copy wherever libvirt can do it (native transport): VIR_MIGRATE_POSTCOPY is set,
# the switch is the policy's when pre-copy will not converge (tests/lab/test_convergence.py).
POSTCOPY = "VIR_MIGRATE_POSTCOPY"
SCENARIOS: dict[str, tuple[dict[str, Any], str, set[str]]] = {
    "native-client-to-two-daemons": ({"control": "direct"}, "migrate3", {POSTCOPY}),
    "native-client-and-p2p": (
        {"dest_connection": True},
        "migrate2",
        {"VIR_MIGRATE_PEER2PEER", POSTCOPY},
    ),
    "tunnelled-client-and-p2p": (
        {"dest_connection": True, "transport": "tunnelled"},
        "migrate2",
        {"VIR_MIGRATE_PEER2PEER", "VIR_MIGRATE_TUNNELLED"},
    ),
    "native-p2p": ({}, "migrateToURI3", {"VIR_MIGRATE_PEER2PEER", POSTCOPY}),
    "tunnelled-p2p": (
        {"transport": "tunnelled"},
        "migrateToURI3",
        {"VIR_MIGRATE_PEER2PEER", "VIR_MIGRATE_TUNNELLED"},
    ),
}


def call_of(lab: Lab, job: Job) -> dict[str, Any]:
    started = [e for e in lab.drover.events(job.id) if e["event"] == "migration.started"]
    assert len(started) == 1
    call: dict[str, Any] = started[0]["call"]
    return call


def moved(lab: Lab, domain: str, src: str, dst: str) -> None:
    assert lab.running_on(domain) == [dst]
    assert lab.view(dst, domain).state == libvirt.VIR_DOMAIN_RUNNING
    assert not lab.view(src, domain).active


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_moves_the_guest_there_and_back(lab: Lab, scenario: str) -> None:
    options, api, flags = SCENARIOS[scenario]
    lab.home("idle-1")
    job = lab.migrate("idle-1", "lab1", "lab2", **options)
    assert job.state.value == "succeeded", job.reason
    moved(lab, "idle-1", "lab1", "lab2")
    call = call_of(lab, job)
    assert call["api"] == api
    assert set(call["flags"]) == {"VIR_MIGRATE_LIVE"} | flags
    tunnelled = "VIR_MIGRATE_TUNNELLED" in flags
    assert ("migrate_uri" in call["params"]) is (not tunnelled and api != "migrate2")
    back = lab.migrate("idle-1", "lab2", "lab1", **options)
    assert back.state.value == "succeeded", back.reason
    moved(lab, "idle-1", "lab2", "lab1")


# Each lab libvirtd listens on libvirt's default TCP port (lab/libvirtd.py: listen_tcp, no
# tcp_port): a port the disks' NBD server cannot take on that host.
LIBVIRTD_TCP_PORT = 16509
LIBVIRT_REFUSAL = "direct migration is not supported by the source host"


def test_unmanaged_direct_is_refused_by_qemu_and_leaves_the_guest_alone(lab: Lab) -> None:
    lab.home("idle-1")
    # libvirt's own word, asked directly on lab1's libvirtd: QEMU has no unmanaged direct
    # migration (refused before anything is asked of QEMU or the destination).
    conn = libvirt.open(lab.uri("lab1"))
    try:
        migrate_uri = f"tcp://{lab.drover.settings.host('lab2').migration_address}"
        params = {libvirt.VIR_MIGRATE_PARAM_URI: migrate_uri}
        with pytest.raises(libvirt.libvirtError, match=LIBVIRT_REFUSAL):
            conn.lookupByName("idle-1").migrateToURI3(None, params, libvirt.VIR_MIGRATE_LIVE)
    finally:
        conn.close()
    # drover says so before anything moves, and its dry run says so too (it used to pass).
    dry = lab.migrate("idle-1", "lab1", "lab2", control="unmanaged", dry_run=True)
    job = lab.migrate("idle-1", "lab1", "lab2", control="unmanaged")
    for ended in (dry, job):
        assert ended.state.value == "failed", ended.reason
        assert ended.reason is not None and LIBVIRT_REFUSAL in ended.reason
        assert "use --p2p or --direct" in ended.reason
        refused = [c for c in ended.result.source_checks if not c.passed]
        assert [(c.check, c.host) for c in refused] == [("control_flow", "lab1")]
        assert not [e for e in lab.drover.events(ended.id) if e["event"] == "migration.started"]
    assert set(dry.phases) == {"source_preflight", "destination_prepare"}  # both sides judged
    assert set(job.phases) == {"source_preflight"}  # the destination was never asked
    assert lab.running_on("idle-1") == ["lab1"]
    assert lab.view("lab1", "idle-1").state == libvirt.VIR_DOMAIN_RUNNING
    assert not lab.view("lab2", "idle-1").exists
    assert lab.drover.store.reserved_mib("lab2") == 0
    # The other control flows are not touched by the check: the same guest moves by p2p.
    moved_job = lab.migrate("idle-1", "lab1", "lab2")
    assert moved_job.state.value == "succeeded", moved_job.reason
    moved(lab, "idle-1", "lab1", "lab2")
    assert [c.check for c in moved_job.result.source_checks] == ["disk_safety"]


def test_tls_toward_a_host_without_certificates_is_refused_before_anything_moves(
    lab: Lab, tmp_path: Path
) -> None:
    """This lab is up without --tls: no host has QEMU migration certificates. `--tls` used to
    pass a dry run and fail only once QEMU had started on the destination; each side's
    pre-check now says what is missing where, or which file there is unusable, and nothing
    moves."""
    lab.home("idle-1")
    pki = Path(lab.status["config"]).parent / "hosts"
    source_certs, destination_certs = pki / "lab1/pki/qemu", pki / "lab2/pki/qemu"
    dry = lab.migrate("idle-1", "lab1", "lab2", tls=True, dry_run=True)
    job = lab.migrate("idle-1", "lab1", "lab2", tls=True)
    for ended in (dry, job):
        assert ended.state.value == "failed", ended.reason
        assert ended.reason is not None and "ca-cert.pem missing" in ended.reason
        assert not [e for e in lab.drover.events(ended.id) if e["event"] == "migration.started"]
    verdicts = [*dry.result.source_checks, *dry.result.destination_checks]
    assert {(c.check, c.host) for c in verdicts if not c.passed} == {
        ("tls", "lab1"),
        ("tls", "lab2"),
    }
    assert set(job.phases) == {"source_preflight"}  # the destination was never asked
    # The source's CA in place (lab1's own /etc/pki): the destination's missing server files
    # are what refuses, at its prepare, with nothing taken there; then its files present but
    # issued by another CA; then the source's CA file junk.
    ours, theirs = Certs(tmp_path / "ours"), Certs(tmp_path / "theirs")
    source_certs.mkdir(parents=True, exist_ok=True)
    destination_certs.mkdir(parents=True, exist_ok=True)
    shutil.copy(ours.dir / "ca-cert.pem", source_certs)
    try:
        job = lab.migrate("idle-1", "lab1", "lab2", tls=True)
        assert job.reason is not None and "lab2: no QEMU migration TLS server" in job.reason
        assert "server-key.pem" in job.reason
        shutil.copy(ours.dir / "ca-cert.pem", destination_certs)
        for name in ("server-cert.pem", "server-key.pem"):
            shutil.copy(theirs.dir / name, destination_certs)
        another_ca = lab.migrate("idle-1", "lab1", "lab2", tls=True)
        (source_certs / "ca-cert.pem").write_text("placeholder\n")
        junk_ca = lab.migrate("idle-1", "lab1", "lab2", tls=True)
    finally:
        (source_certs / "ca-cert.pem").unlink()
        for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
            (destination_certs / name).unlink(missing_ok=True)
    for ended in (job, another_ca):
        assert ended.state.value == "failed", ended.reason
        assert [c.check for c in ended.result.destination_checks if not c.passed] == ["tls"]
    assert another_ca.reason is not None
    assert "lab2: unusable QEMU migration TLS server files" in another_ca.reason
    assert "server-cert.pem was not issued by the CA in ca-cert.pem" in another_ca.reason
    assert junk_ca.state.value == "failed", junk_ca.reason
    assert (
        junk_ca.reason is not None and "lab1: unusable QEMU migration TLS client" in junk_ca.reason
    )
    assert "ca-cert.pem is not a PEM certificate" in junk_ca.reason
    assert set(junk_ca.phases) == {"source_preflight"}
    for ended in (job, another_ca, junk_ca):
        assert not [e for e in lab.drover.events(ended.id) if e["event"] == "migration.started"]
    assert lab.running_on("idle-1") == ["lab1"]
    assert not lab.view("lab2", "idle-1").exists
    assert lab.drover.store.reserved_mib("lab2") == 0


def test_suspend_dname_and_the_safety_flags(lab: Lab) -> None:
    lab.home("idle-1")
    job = lab.migrate(
        "idle-1",
        "lab1",
        "lab2",
        suspend=True,
        dname="idle-renamed",
        change_protection=True,
        abort_on_error=True,
        compressed=True,
        bandwidth_mib=500,
    )
    assert job.state.value == "succeeded", job.reason
    assert lab.view("lab2", "idle-renamed").state == libvirt.VIR_DOMAIN_PAUSED
    assert not lab.view("lab2", "idle-1").exists
    assert not lab.view("lab1", "idle-1").active
    flags = set(call_of(lab, job)["flags"])
    assert {
        "VIR_MIGRATE_PAUSED",
        "VIR_MIGRATE_CHANGE_PROTECTION",
        "VIR_MIGRATE_ABORT_ON_ERROR",
        "VIR_MIGRATE_COMPRESSED",
    } <= flags
    assert POSTCOPY not in flags  # libvirt refuses post-copy into a paused guest
    # A paused guest stays paused on the way back; its old name returns with --dname. The
    # policy's post-copy does not apply to a guest paused at the start, and says why.
    back = lab.migrate("idle-renamed", "lab2", "lab1", dname="idle-1")
    assert back.state.value == "succeeded", back.reason
    assert POSTCOPY not in call_of(lab, back)["flags"]
    assert back.policy is not None and "paused" in back.policy.sources["allow_postcopy"]
    assert lab.view("lab1", "idle-1").state == libvirt.VIR_DOMAIN_PAUSED
    lab.set_paused("idle-1", False)


def test_parallel_connections_and_explicit_uris(lab: Lab) -> None:
    lab.home("idle-1")
    dst = lab.status["hosts"]["lab2"]["address"]
    uri = f"tcp://{dst}:49200"
    job = lab.migrate("idle-1", "lab1", "lab2", parallel=2, migrate_uri=uri, listen_address=dst)
    assert job.state.value == "succeeded", job.reason
    moved(lab, "idle-1", "lab1", "lab2")
    call = call_of(lab, job)
    assert "VIR_MIGRATE_PARALLEL" in call["flags"]
    assert call["params"] == {"migrate_uri": uri, "listen_address": dst, "parallel.connections": 2}
    lab.home("idle-1")


def test_offline_migration_moves_only_the_definition(lab: Lab) -> None:
    lab.home("idle-1")
    job = lab.migrate("idle-1", "lab1", "lab2", live=False, offline=True, persistent=True)
    assert job.state.value == "succeeded", job.reason
    there = lab.view("lab2", "idle-1")
    assert there.exists and there.persistent and not there.active
    assert lab.running_on("idle-1") == ["lab1"]  # still running where it was
    undefine(lab, "lab2", "idle-1")


def test_offline_with_undefine_source_of_a_running_guest_is_refused(lab: Lab) -> None:
    """Probe: libvirt copied the running guest's definition and kept the source's, and the
    job "succeeded" with the guest defined on both hosts (start the copy, and one guest runs
    twice on its disks). Refused before anything moves; the copy alone is still allowed."""
    lab.home("idle-1")
    job = lab.migrate(
        "idle-1", "lab1", "lab2", live=False, offline=True, persistent=True, undefine_source=True
    )
    assert job.state.value == "failed"
    assert "--undefine-source would leave it defined on both hosts" in (job.reason or "")
    assert not lab.view("lab2", "idle-1").exists
    here = lab.view("lab1", "idle-1")
    assert here.active and here.persistent
    assert [e for e in lab.drover.events(job.id) if e["event"] == "migration.started"] == []


@pytest.fixture
def disk_guest(lab: Lab) -> Iterator[str]:
    """disk-1: a running guest with a local 64 MiB qcow2 disk on lab1 only."""
    with local_disk_guest(lab, "disk-1"):
        yield "disk-1"


@pytest.mark.parametrize("mode", ["all", "inc"])
def test_copy_storage_creates_the_target_image_and_moves_the_guest(
    lab: Lab, disk_guest: str, mode: str
) -> None:
    lab2_image = Path(lab.status["config"]).parent / "hosts/lab2/lib/images/disk-1.qcow2"
    job = lab.migrate(disk_guest, "lab1", "lab2", copy_storage=mode)
    assert job.state.value == "succeeded", job.reason
    moved(lab, disk_guest, "lab1", "lab2")
    assert job.handoff.created_images == ["/var/lib/libvirt/images/disk-1.qcow2"]
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(lab2_image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '"format": "qcow2"' in info and '"virtual-size": 67108864' in info


def test_copy_storage_target_is_removed_when_the_job_fails(lab: Lab, disk_guest: str) -> None:
    lab2_image = Path(lab.status["config"]).parent / "hosts/lab2/lib/images/disk-1.qcow2"
    # The made image exists once prepare ran; the disks' NBD server then cannot listen on
    # lab2's own libvirtd port, and libvirt fails the migration after prepare.
    job = lab.migrate(disk_guest, "lab1", "lab2", copy_storage="all", disks_port=LIBVIRTD_TCP_PORT)
    assert job.state.value == "failed"
    assert job.reason is not None and "nbd-server-start" in job.reason
    assert job.handoff.created_images == ["/var/lib/libvirt/images/disk-1.qcow2"]
    wait_for(lambda: not lab2_image.exists(), 30, "the target image to be removed")
    assert lab.running_on(disk_guest) == ["lab1"]


def test_postcopy_switch_completes_a_migration_that_cannot_converge(
    lab: Lab, dirty_running: None
) -> None:
    # 8 MiB/s is below dirty-1's dirty rate: pre-copy alone would never finish. The `manual`
    # policy takes no action of its own: the operator's switch is what lands it.
    job_id = lab.drover.submit(
        domain="dirty-1",
        src="lab1",
        dst="lab2",
        live=True,
        postcopy=True,
        bandwidth_mib=8,
        policy="manual",
    )
    d = lab.drover

    def copying() -> bool:
        return any(
            e["event"] == "migration.progress"
            and e["stage"] == "transfer"
            and e["memory_iteration"] >= 2
            for e in d.events(job_id)
        )

    wait_for(copying, 60, "pre-copy to reach its second pass")
    d.start_postcopy(job_id)
    job = d.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert job.state.value == "succeeded", job.reason
    names = [e["event"] for e in d.events(job_id)]
    assert "migration.postcopy_started" in names
    assert lab.running_on("dirty-1") == ["lab2"]


@pytest.mark.parametrize(
    ("action", "state", "lands_on"),
    [
        ("suspend", "succeeded", "lab2"),
        ("postcopy", "succeeded", "lab2"),
        ("abort", "failed", "lab1"),
    ],
)
def test_a_completion_timeout_ends_a_migration_that_cannot_converge(
    lab: Lab, dirty_running: None, action: str, state: str, lands_on: str
) -> None:
    # At 8 MiB/s dirty-1's first pass alone (its 64 MiB rewritten) takes about 8 s: the timeout
    # rings first, and without it the copy would go on for ever (at 32 MiB/s a guest starved by
    # a loaded machine dirtied too little and converged once, in another case).
    job = lab.migrate(
        "dirty-1",
        "lab1",
        "lab2",
        bandwidth_mib=8,
        completion_timeout_s=3,
        timeout_action=action,
        postcopy=action == "postcopy",
    )
    assert job.state.value == state, job.reason
    events = lab.drover.events(job.id)
    # The job's own timer, not the policy's judgement: the one action asked for, at 3 s.
    acted = [e for e in events if e["event"] == "policy.step" and e["action"] != "set_downtime"]
    assert [(e["action"], e["trigger"], e["done"]) for e in acted] == [
        (action, "completion_timeout", True)
    ]
    assert "completion timeout of 3s reached" in acted[0]["reason"]
    assert acted[0]["elapsed_ms"] > 3000
    if state == "failed":
        assert job.reason is not None and "completion timeout of 3s" in job.reason
    # Where libvirt says, and running: a suspended guest resumes on arrival, an aborted one
    # is never left paused at home.
    assert lab.running_on("dirty-1") == [lands_on]
    assert lab.view(lands_on, "dirty-1").state == libvirt.VIR_DOMAIN_RUNNING
