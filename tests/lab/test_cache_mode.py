"""A disk cache mode libvirt deems unsafe, refused by drover before anything moves.

In the Linux guest's lab (tests/lab/test_linux_guest.py's fixture), a small guest with a
`cache='writeback'` disk on shared storage that is not a cluster file system: a block device
every host sees at the same path (a loop device over one file, as a SAN LUN is one device to
every host). libvirt 9.0 trusts its GlusterFS volume as a coherent cluster file system with
any cache mode (virFileIsClusterFS, mask 0x446 in the 9.0 library), so the volume cannot show
this refusal. libvirt migrates such a disk only when the guest's running QEMU can drop its
page cache on arrival (capability `migration-file-drop-cache`); lab/caps_faults.py withholds
it from the running guest's status record on lab1, honestly: lab1's libvirt then judges the
guest as one running on a QEMU without it. drover's source pre-check reads the same record and
refuses; libvirt, asked directly,
refuses too; `--unsafe` (VIR_MIGRATE_UNSAFE) moves it. With the capability present the same
guest moves. Every verdict is checked through libvirt on both hosts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from lab.caps_faults import recorded_flag, status_record, withhold_guest_flag
from lab.guests import GuestSpec, domain_xml
from lab.proc import run
from tests.lab.test_linux_guest import LinuxLab, linux_lab  # noqa: F401 (the lab fixture)
from tests.support.lab_fixtures import JOB_TIMEOUT_S, view
from worker.drop_cache import FLAG, drop_cache_in

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

GUEST = "cache-wb-1"
LUN_BYTES = 64 << 20
LIBVIRT_REFUSAL = "Migration may lead to data corruption if disks use cache other than none"


def guest_xml(disk: str) -> str:
    disk_xml = f"""<disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source dev='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon"""
    return domain_xml(GuestSpec(GUEST, 64)).replace("<memballoon", disk_xml, 1)


@pytest.fixture
def shared_disk(linux_lab: LinuxLab) -> Iterator[str]:  # noqa: F811
    """A block device every lab host sees at the same path (a loop device over a file in the
    lab's directory); afterwards the guest is gone from every host and the device detached."""
    backing = linux_lab.layout.dir / f"{GUEST}.lun"
    with open(backing, "wb") as f:
        f.truncate(LUN_BYTES)
    device = run(["losetup", "--find", "--show", str(backing)]).strip()
    try:
        yield device
    finally:
        try:
            for host in ("lab1", "lab2"):
                remove_guest(linux_lab.uri(host))
        finally:
            run(["losetup", "--detach", device])
            backing.unlink()


def remove_guest(uri: str) -> None:
    """The test guest gone from the host at `uri`, whatever a test left there."""
    conn = libvirt.open(uri)
    try:
        dom = next((d for d in conn.listAllDomains() if d.name() == GUEST), None)
        persistent = dom is not None and bool(dom.isPersistent())
        if dom is not None and dom.isActive():
            dom.destroy()  # a transient domain (a migrated one) is gone with it
        if dom is not None and persistent:
            dom.undefine()
    finally:
        conn.close()


def start_on_lab1(lab: LinuxLab, disk: str) -> bool:
    """Start the guest on lab1; whether lab1's libvirt recorded the drop-cache capability
    for its QEMU (the guest's status record, which drover's pre-check reads too)."""
    conn = libvirt.open(lab.uri("lab1"))
    try:
        conn.defineXML(guest_xml(disk)).create()
    finally:
        conn.close()
    present = drop_cache_in(status_record("lab1", GUEST).read_text()).present
    assert present is not None
    return present


def migrate(lab: LinuxLab, **opts: Any) -> tuple[str, str | None]:
    job = lab.drover.wait(
        lab.drover.submit(domain=GUEST, src="lab1", dst="lab2", live=True, **opts),
        timeout=JOB_TIMEOUT_S,
    )
    return job.state.value, job.reason


def test_a_writeback_disk_without_drop_cache_is_refused_unless_unsafe(
    linux_lab: LinuxLab,  # noqa: F811
    shared_disk: str,
) -> None:
    assert start_on_lab1(linux_lab, shared_disk) is True
    withhold_guest_flag("lab1", GUEST, FLAG, linux_lab.uri("lab1"))
    assert not recorded_flag("lab1", GUEST, FLAG)
    state, reason = migrate(linux_lab)
    print(f"\nrefused: {reason}")
    assert state == "failed"
    assert f"vda ({shared_disk}, cache writeback) on shared storage" in (reason or "")
    assert "no migration-file-drop-cache" in (reason or "")
    assert linux_lab.running_on(GUEST) == ["lab1"]
    assert view(linux_lab.uri("lab1"), GUEST).state == libvirt.VIR_DOMAIN_RUNNING
    assert not view(linux_lab.uri("lab2"), GUEST).exists
    # libvirt itself, asked without drover, refuses it for the same reason.
    src, dst = libvirt.open(linux_lab.uri("lab1")), libvirt.open(linux_lab.uri("lab2"))
    try:
        with pytest.raises(libvirt.libvirtError) as refused:
            src.lookupByName(GUEST).migrate3(dst, {}, libvirt.VIR_MIGRATE_LIVE)
    finally:
        src.close()
        dst.close()
    print(f"libvirt: {refused.value.get_error_message()}")
    assert refused.value.get_error_code() == libvirt.VIR_ERR_MIGRATE_UNSAFE
    assert LIBVIRT_REFUSAL in refused.value.get_error_message()
    assert linux_lab.running_on(GUEST) == ["lab1"]
    assert not view(linux_lab.uri("lab2"), GUEST).exists
    # --unsafe: libvirt's VIR_MIGRATE_UNSAFE, and the guest moves.
    state, reason = migrate(linux_lab, unsafe=True)
    assert state == "succeeded", reason
    assert linux_lab.running_on(GUEST) == ["lab2"]
    assert view(linux_lab.uri("lab2"), GUEST).state == libvirt.VIR_DOMAIN_RUNNING
    assert not view(linux_lab.uri("lab1"), GUEST).active


def test_a_writeback_disk_with_drop_cache_moves(
    linux_lab: LinuxLab,  # noqa: F811
    shared_disk: str,
) -> None:
    assert start_on_lab1(linux_lab, shared_disk) is True
    state, reason = migrate(linux_lab)
    assert state == "succeeded", reason
    assert linux_lab.running_on(GUEST) == ["lab2"]
    assert view(linux_lab.uri("lab2"), GUEST).state == libvirt.VIR_DOMAIN_RUNNING
    assert not view(linux_lab.uri("lab1"), GUEST).active
