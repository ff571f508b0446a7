"""The Linux guest's pieces that need no lab: its domain XML, addresses, the lab's record of it,
the pinger's packets and gap, the continuity verdict, and the shared storage's glusterd file.

The guest itself (boot, network, disk, migrations) is tested on the lab:
tests/lab/test_linux_guest.py.
"""

from __future__ import annotations

import lzma
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from jobs.model import Job
from lab import guest_probe, linux_guest, shared_storage
from lab.guest_move import GuestMove
from lab.guest_probe import GuestStatus, PingResult
from lab.layout import HOST_GUEST_BRIDGE, LabLayout
from lab.linux_domain import LOCAL, SHARED, domain_xml, local_path, plan
from lab.linux_guest import LinuxImage
from lab.proc import LabError
from lab.state import LabState

LAB_ID = 7


@pytest.fixture
def lab(tmp_path: Path) -> LabLayout:
    return LabLayout(lab_id=LAB_ID, dir=tmp_path / "lab")


def test_the_two_kinds_get_distinct_addresses_macs_and_disks(lab: LabLayout) -> None:
    shared = plan(lab, 2, local=False)
    local = plan(lab, 2, local=True)
    every = shared + local
    assert [g.name for g in every] == ["linux-1", "linux-2", "linux-local-1", "linux-local-2"]
    assert len({g.address for g in every}) == 4 and len({g.mac for g in every}) == 4
    assert all(g.address.startswith(f"10.214.{LAB_ID}.") for g in every)
    assert {g.kind for g in shared} == {SHARED} and {g.kind for g in local} == {LOCAL}
    assert shared[0].disk == str(lab.shared_dir / "linux-1.qcow2")
    assert local[0].disk == "/var/lib/libvirt/images/linux-local-1.qcow2"
    # seen from the root namespace: under the host's own copy of /var/lib/libvirt
    assert local_path(local[0], lab.host(2)) == lab.host(2).dir / "lib/images/linux-local-1.qcow2"


def test_domain_xml_boots_the_image_with_a_safe_disk_and_the_guest_bridge(
    lab: LabLayout,
) -> None:
    guest = plan(lab, 1, local=False)[0]
    image = LinuxImage(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd.gz"))
    root = ET.fromstring(domain_xml(guest, image))
    assert root.get("type") == "qemu"
    assert root.findtext("os/kernel") == "/k/vmlinuz"
    assert f"drover.ip={guest.address}/24" in (root.findtext("os/cmdline") or "")
    driver = root.find("devices/disk/driver")
    assert driver is not None and driver.get("cache") == "none" and driver.get("type") == "qcow2"
    source = root.find("devices/disk/source")
    assert source is not None and source.get("file") == guest.disk
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "bridge"
    assert nic.find("source").get("bridge") == HOST_GUEST_BRIDGE  # type: ignore[union-attr]
    assert nic.find("mac").get("address") == guest.mac  # type: ignore[union-attr]


def test_the_lab_record_keeps_its_linux_guests(lab: LabLayout) -> None:
    lab.dir.mkdir(parents=True)
    guests = plan(lab, 1, local=False) + plan(lab, 1, local=True)
    LabState(lab_id=LAB_ID, config="c", redis_url="r", linux_guests=guests).save(lab)
    loaded = LabState.load(lab)
    assert loaded is not None and loaded.linux_guests == guests


def test_echo_request_checksum_verifies() -> None:
    packet = guest_probe._echo_request(0x1234, 7)
    assert guest_probe._checksum(packet) == 0
    kind, code, _, ident, seq = struct.unpack("!BBHHH", packet[:8])
    assert (kind, code, ident, seq) == (guest_probe.ICMP_ECHO_REQUEST, 0, 0x1234, 7)


def _status(counter: int, boot: str = "b1", gaps: int = 0, errors: int = 0) -> GuestStatus:
    return GuestStatus(
        counter=counter,
        last_write=0,
        lines=counter,
        gaps=gaps,
        write_errors=errors,
        boot_id=boot,
        uptime=1.0,
        memwriter=False,
        writer=True,
    )


@pytest.mark.parametrize(
    ("after", "problem"),
    [
        (_status(20), None),
        (_status(20, boot="b2"), "rebooted"),
        (_status(10), "counter 10 -> 10"),
        (_status(20, gaps=1), "1 gaps"),
        (_status(20, errors=2), "2 write errors"),
    ],
)
def test_continuity_verdict(after: GuestStatus, problem: str | None) -> None:
    m = GuestMove(
        job=Job.model_construct(), ping=PingResult(1, 1, 0.0), before=_status(10), after=after
    )
    problems = m.continuity_problems()
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_glusterd_binds_the_labs_own_address_and_brick_ports(lab: LabLayout) -> None:
    vol = shared_storage.glusterd_vol(lab)
    assert f"bind-address {lab.root_address}" in vol
    base = shared_storage.BRICK_BASE_PORT + shared_storage.BRICK_PORTS_PER_LAB * LAB_ID
    assert f"base-port {base}" in vol and f"max-port {base + 49}" in vol
    assert str(lab.dir / "gluster" / "state") in vol  # not the system's /var/lib/glusterd
    other = shared_storage.glusterd_vol(LabLayout(lab_id=LAB_ID + 1, dir=lab.dir))
    assert f"base-port {base + shared_storage.BRICK_PORTS_PER_LAB}" in other


def test_a_compressed_module_is_unpacked_for_busybox_insmod(tmp_path: Path) -> None:
    (tmp_path / "virtio.ko.xz").write_bytes(lzma.compress(b"\x7fELF module"))
    linux_guest._copy_module(tmp_path / "virtio.ko", tmp_path / "out.ko")
    assert (tmp_path / "out.ko").read_bytes() == b"\x7fELF module"
    with pytest.raises(LabError, match=r"no module missing\.ko"):
        linux_guest._copy_module(tmp_path / "missing.ko", tmp_path / "x.ko")
