"""Pre-checks (docs/prechecks.md): each refuses its case before anything moves, the guest
untouched on both hosts as libvirt shows them; --unsafe and --migrate-disks let libvirt do
what they say; a dry run queues nothing and reports the refusal.

The guests here are the lab's small idle guest with extra disks (empty qcow2 images):
`local` disks live in a host's own /var/lib/libvirt/images (each lab host has its own),
`shared` ones in a directory of the lab that every host sees at the same path.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from jobs.keys import job_key
from lab.cpu_faults import restore_cpu, withhold_cpu_feature
from lab.guests import GuestSpec, domain_xml
from tests.support.cli import run_drover
from tests.support.disk_guest import undefine
from tests.support.lab_fixtures import Lab

pytestmark = pytest.mark.lab

IMAGES = "/var/lib/libvirt/images"  # inside each host: its own directory
HUGE = "1T"  # a virtual size no lab host has room for (the qcow2 file stays tiny)


@dataclass(frozen=True)
class Disk:
    target: str
    shared: bool
    cache: str = "none"
    size: str = "16M"


def _lab_dir(lab: Lab) -> Path:
    return Path(lab.status["config"]).parent


def _host_path(lab: Lab, host: str, inside: str) -> Path:
    """A path inside `host`'s /var/lib/libvirt, as the root namespace sees it."""
    return _lab_dir(lab) / "hosts" / host / "lib" / Path(inside).relative_to("/var/lib/libvirt")


def _disk_path(lab: Lab, name: str, disk: Disk) -> str:
    if disk.shared:
        return str(_lab_dir(lab) / "shared" / f"{name}-{disk.target}.qcow2")
    return f"{IMAGES}/{name}-{disk.target}.qcow2"


def _remove(lab: Lab, name: str) -> None:
    for host in lab.hosts():
        undefine(lab, host, name)


@pytest.fixture
def make_guest(lab: Lab) -> Iterator[object]:
    """make_guest(name, disks, cpu_features=()) starts a transient guest on lab1."""
    made: list[tuple[str, list[Disk]]] = []

    def make(
        name: str, disks: list[Disk], cpu_features: tuple[str, ...] = (), cpu: str | None = None
    ) -> str:
        devices = ""
        for disk in disks:
            path = _disk_path(lab, name, disk)
            real = Path(path) if disk.shared else _host_path(lab, "lab1", path)
            real.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(real), disk.size], check=True
            )
            devices += (
                f"<disk type='file' device='disk'><driver name='qemu' type='qcow2' "
                f"cache='{disk.cache}'/><source file='{path}'/>"
                f"<target dev='{disk.target}' bus='virtio'/></disk>"
            )
        xml = domain_xml(GuestSpec(name, 64)).replace("<devices>", f"<devices>{devices}", 1)
        features = "".join(f"<feature policy='require' name='{f}'/>" for f in cpu_features)
        xml = xml.replace("</model></cpu>", f"</model>{features}</cpu>", 1)
        if cpu is not None:  # another <cpu> element altogether
            xml = re.sub(r"<cpu .*?</cpu>", cpu, xml, count=1, flags=re.DOTALL)
        conn = libvirt.open(lab.uri("lab1"))
        try:
            conn.createXML(xml, 0)
        finally:
            conn.close()
        made.append((name, disks))
        return name

    yield make
    for name, disks in made:
        _remove(lab, name)
        for disk in disks:
            path = _disk_path(lab, name, disk)
            for host in lab.hosts():
                real = Path(path) if disk.shared else _host_path(lab, host, path)
                real.unlink(missing_ok=True)


def _untouched(lab: Lab, name: str) -> None:
    """The guest runs on lab1 and nowhere else, as each host's libvirtd says."""
    assert lab.running_on(name) == ["lab1"]
    assert lab.view("lab1", name).state == libvirt.VIR_DOMAIN_RUNNING
    for host in lab.hosts():
        if host != "lab1":
            assert not lab.view(host, name).exists


def _refused(lab: Lab, name: str, phase: str, **opts: object) -> str:
    job = lab.migrate(name, "lab1", "lab2", **opts)
    assert job.state.value == "failed", job.reason
    assert job.reason is not None
    assert job.phases[phase].error == job.reason
    assert "perform" not in job.phases
    _untouched(lab, name)
    assert lab.drover.store.reserved_mib("lab2") == 0
    return job.reason


@pytest.fixture
def lab2_without_aes(lab: Lab) -> Iterator[None]:
    withhold_cpu_feature("lab2", "aes")
    try:
        yield
    finally:
        restore_cpu("lab2")


def test_a_cpu_the_destination_lacks_is_refused(
    lab: Lab, make_guest: object, lab2_without_aes: None
) -> None:
    name = make_guest("aes-1", [], cpu_features=("aes",))  # type: ignore[operator]
    reason = _refused(lab, name, "destination_prepare")
    assert reason.startswith("lab2 cannot run the guest's CPU model")
    assert "aes" in reason
    # lab3's libvirt still offers aes: the same guest moves there.
    job = lab.migrate(name, "lab1", "lab3")
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on(name) == ["lab3"]


def test_a_host_model_guest_is_judged_as_libvirt_expanded_it(
    lab: Lab, make_guest: object, lab2_without_aes: None
) -> None:
    # Running, its live XML names TCG's host model with every feature (aes among them).
    name = make_guest("hm-1", [], cpu="<cpu mode='host-model'/>")  # type: ignore[operator]
    reason = _refused(lab, name, "destination_prepare")
    assert reason.startswith("lab2 cannot run the guest's CPU model"), reason
    assert "aes" in reason


def test_a_maximum_cpu_guest_needs_the_source_s_very_host_cpu(
    lab: Lab, make_guest: object, lab2_without_aes: None
) -> None:
    name = make_guest("max-1", [], cpu="<cpu mode='maximum'/>")  # type: ignore[operator]
    reason = _refused(lab, name, "destination_prepare")
    assert reason == (
        "lab2 cannot run the guest's CPU model: maximum needs a host CPU identical to the "
        "source's (max-1, the source's host CPU against this one)"
    )
    job = lab.migrate(name, "lab1", "lab3")  # lab3's CPU is lab1's
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on(name) == ["lab3"]


def test_a_disk_the_destination_does_not_see_is_refused(lab: Lab, make_guest: object) -> None:
    name = make_guest("local-1", [Disk("vda", shared=False)])  # type: ignore[operator]
    # On local storage: unsafe by libvirt's rule, cache none or not (the source says so).
    reason = _refused(lab, name, "source_preflight")
    assert reason.startswith(f"unsafe to migrate: vda ({IMAGES}/local-1-vda.qcow2, cache none)")
    # With --unsafe, the destination's own view refuses it before QEMU is started there.
    reason = _refused(lab, name, "destination_prepare", unsafe=True)
    assert reason == (
        f"lab2 does not see vda ({IMAGES}/local-1-vda.qcow2): it is not copied, use --copy-storage"
    )


def test_an_unsafe_disk_is_refused_unless_unsafe(lab: Lab, make_guest: object) -> None:
    # Seen by every host at the same path (the lab's shared directory), cache writeback.
    name = make_guest("wb-1", [Disk("vda", shared=True, cache="writeback")])  # type: ignore[operator]
    reason = _refused(lab, name, "source_preflight")
    assert reason.startswith("unsafe to migrate: vda (")
    assert "cache writeback" in reason
    job = lab.migrate(name, "lab1", "lab2", unsafe=True)
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on(name) == ["lab2"]
    assert not lab.view("lab1", name).exists


def test_a_destination_without_room_for_the_images_is_refused(lab: Lab, make_guest: object) -> None:
    name = make_guest("big-1", [Disk("vda", shared=False, size=HUGE)])  # type: ignore[operator]
    reason = _refused(lab, name, "destination_prepare", copy_storage="all")
    # Measured where the image would be made (its nearest existing directory there).
    assert re.fullmatch(
        r"lab2: /var/lib/libvirt(/images)? has \d+ MiB free, the images need 1048576 MiB", reason
    ), reason
    assert not _host_path(lab, "lab2", f"{IMAGES}/big-1-vda.qcow2").exists()


def test_migrate_disks_copies_only_the_chosen_disk(lab: Lab, make_guest: object) -> None:
    name = make_guest(  # type: ignore[operator]
        "two-1", [Disk("vda", shared=False), Disk("vdb", shared=True)]
    )
    # vdb is not copied: on storage every host sees, but not a shared file system (--unsafe).
    job = lab.migrate(name, "lab1", "lab2", copy_storage="all", migrate_disks=["vda"], unsafe=True)
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on(name) == ["lab2"]
    assert job.handoff.created_images == [f"{IMAGES}/two-1-vda.qcow2"]
    assert _host_path(lab, "lab2", f"{IMAGES}/two-1-vda.qcow2").exists()
    assert job.phases["perform"].error is None
    conn = libvirt.open(lab.uri("lab2"))
    try:
        xml = conn.lookupByName(name).XMLDesc(0)
    finally:
        conn.close()
    assert _disk_path(lab, name, Disk("vdb", shared=True)) in xml


def test_dry_run_queues_nothing_and_reports_the_refusal(lab: Lab, make_guest: object) -> None:
    lab.home("idle-1")
    passed = lab.migrate("idle-1", "lab1", "lab2", dry_run=True)
    assert passed.state.value == "checked", passed.reason
    checks = {c.check for c in passed.result.destination_checks if c.passed}
    assert {"cpu", "memory", "shared_disks", "hugepages"} <= checks
    assert set(passed.phases) == {"source_preflight", "destination_prepare"}
    assert lab.running_on("idle-1") == ["lab1"]
    assert not lab.view("lab2", "idle-1").exists

    name = make_guest("local-2", [Disk("vda", shared=False, cache="writeback")])  # type: ignore[operator]
    job = lab.migrate(name, "lab1", "lab2", dry_run=True)
    assert job.state.value == "failed"
    assert job.reason is not None
    # Both sides' checks ran: the source's cache verdict and the destination's path one.
    assert "unsafe to migrate" in job.reason and "lab2 does not see vda" in job.reason
    assert set(job.phases) == {"source_preflight", "destination_prepare"}
    assert lab.drover.store.r.hget(job_key(job.id), "gates") == ""  # no admission slot
    assert lab.drover.store.reserved_mib("lab2") == 0
    _untouched(lab, name)
    # Nothing was left holding the guest: a real migration of it runs at once (and is
    # refused by the same checks, in its own phases).
    again = lab.migrate(name, "lab1", "lab2")
    assert again.state.value == "failed" and "perform" not in again.phases


def test_dry_run_cli_prints_each_verdict_and_exits_by_the_outcome(
    lab: Lab, make_guest: object
) -> None:
    lab.home("idle-1")
    route = ("--from", "lab1", "--to", "lab2", "--live", "--dry-run")
    ok = run_drover(lab.config, "migrate", "idle-1", *route)
    assert ok.returncode == 0, ok.stderr
    assert "nothing moved" in ok.stdout
    assert re.search(r"lab2\s+cpu\s+pass", ok.stdout), ok.stdout
    assert lab.running_on("idle-1") == ["lab1"]
    name = make_guest("local-3", [Disk("vda", shared=False)])  # type: ignore[operator]
    bad = run_drover(lab.config, "migrate", name, *route)
    assert bad.returncode == 1
    assert re.search(r"lab1\s+disk_safety\s+REFUSED: unsafe to migrate", bad.stdout), bad.stdout
    assert "failed: unsafe to migrate" in bad.stderr
    _untouched(lab, name)
    usage = run_drover(lab.config, "migrate", name, *route, "--migrate-disks", "vda")
    assert usage.returncode == 2
    assert "--migrate-disks chooses disks to copy: it needs --copy-storage" in usage.stderr
