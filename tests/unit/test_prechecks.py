"""The pre-check rules over real domain XML and figures (no host, no libvirt daemon)."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest
from pydantic import ValidationError

from config.settings import Settings
from jobs.host_facts import HostCpu
from jobs.phases import Phase
from jobs.policy_choice import effective_policy
from jobs.record import Handoff
from jobs.spec import MigrationSpec
from jobs.workflow import DRY_RUN_PHASES
from worker.cpu_compat import cpu_refusal, guest_cpu_sig
from worker.drop_cache import drop_cache_in, drop_cache_of
from worker.guest_disks import GuestDisk, copied, guest_disks
from worker.migration_call import build_call
from worker.precheck import verdicts
from worker.precheck_cpu import cpu_request, shortened
from worker.precheck_memory import (
    default_page_kib,
    hugepage_needs,
    hugepage_refusal,
    resolved,
)
from worker.precheck_storage import (
    DropCache,
    PathView,
    Room,
    chosen_refusal,
    room_refusal,
    unsafe_refusal,
    unseen_refusal,
)
from worker.storage_view import fs_type_of, path_view, rooms

GUEST = """<domain type='qemu'>
  <name>g</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
    <feature policy='require' name='aes'/>
  </cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='writeback'/>
      <source file='/var/lib/libvirt/images/a.qcow2'/><target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/shared/b.img'/><target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/nfs/c.qcow2'/><target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/boot.iso'/><target dev='hdc' bus='ide'/><readonly/>
    </disk>
    <disk type='file' device='cdrom'><target dev='hdd' bus='ide'/><readonly/></disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source dev='/dev/mapper/d'/><target dev='vdd' bus='virtio'/><shareable/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='pool/e'/><target dev='vde' bus='virtio'/>
    </disk>
  </devices>
</domain>"""

MOUNTINFO = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 0:40 / /nfs rw,relatime shared:2 - nfs4 server:/export rw
31 22 0:41 / /shared rw,relatime shared:3 - ext4 /dev/vdb1 rw
"""


def fs(path: str) -> str:
    return fs_type_of(path, MOUNTINFO)


def test_guest_disks_lists_file_and_block_disks_with_a_source() -> None:
    disks = {d.target: d for d in guest_disks(GUEST)}
    assert sorted(disks) == ["hdc", "vda", "vdb", "vdc", "vdd"]  # not the empty drive, not rbd
    assert disks["vda"] == GuestDisk(
        "vda", "file", "disk", "/var/lib/libvirt/images/a.qcow2", "qcow2", "writeback", False, False
    )
    assert disks["vdc"].cache == "default"
    assert disks["hdc"].readonly and disks["vdd"].shareable and disks["vdd"].kind == "block"


def test_mount_types_by_the_longest_mount_point() -> None:
    assert fs("/nfs/c.qcow2") == "nfs4"
    assert fs("/shared/b.img") == "ext4"
    assert fs("/nfsx/y") == "ext4"  # a prefix of a name is not a mount point
    assert fs("/var/lib/libvirt/images/a.qcow2") == "ext4"


def test_unsafe_disks_are_libvirts_writable_uncopied_files_on_local_storage() -> None:
    disks = guest_disks(GUEST)
    reason = unsafe_refusal(disks, False, None, fs, HAS_DROP)
    # vda on ext4 (writeback) and vdb on ext4 (cache none: libvirt 9.0 refuses it too);
    # vdc: on NFS; hdc: read-only; vdd: a block device.
    assert reason is not None
    assert "vda (/var/lib/libvirt/images/a.qcow2, cache writeback)" in reason
    assert "vdb (/shared/b.img, cache none)" in reason
    for safe in ("vdc", "hdc", "vdd"):
        assert f"{safe} (" not in reason
    assert unsafe_refusal(disks, True, None, fs, HAS_DROP) is None  # vda and vdb are copied
    only_vdb = unsafe_refusal(disks, True, ("vdb",), fs, HAS_DROP) or ""
    assert "vda (" in only_vdb and "vdb (" not in only_vdb  # vda is not chosen


def HAS_DROP() -> DropCache:
    return DropCache(True)


def NO_DROP() -> DropCache:
    return DropCache(False)


def UNKNOWN_DROP() -> DropCache:
    return DropCache(None, "cannot read libvirt's status /run/libvirt/qemu/g.xml: denied")


def disk(target: str, path: str, cache: str, kind: str = "file", **flags: bool) -> GuestDisk:
    return GuestDisk(
        target,
        kind,
        "disk",
        path,
        "qcow2",
        cache,
        flags.get("readonly", False),
        flags.get("shareable", False),
    )


CLUSTER_MOUNTINFO = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 0:40 / /gluster rw,relatime shared:2 - fuse.glusterfs lab:/vol rw
31 22 0:41 / /gfs rw,relatime shared:3 - gfs2 /dev/sdb rw
32 22 0:42 / /ceph rw,relatime shared:4 - ceph mon:/ rw
33 22 0:43 / /nfs rw,relatime shared:5 - nfs4 server:/export rw
"""


def cfs(path: str) -> str:
    return fs_type_of(path, CLUSTER_MOUNTINFO)


@pytest.mark.parametrize("cache", ["writeback", "default", "writethrough", "unsafe"])
def test_a_host_cached_disk_on_shared_storage_needs_qemu_to_drop_its_cache(cache: str) -> None:
    disks = [disk("vda", "/dev/mapper/a", cache, kind="block"), disk("vdb", "/nfs/b.qcow2", cache)]
    assert unsafe_refusal(disks, False, None, cfs, HAS_DROP) is None
    reason = unsafe_refusal(disks, False, None, cfs, NO_DROP) or ""
    assert reason.startswith("unsafe to migrate: vda (/dev/mapper/a, cache " + cache)
    assert "vdb (/nfs/b.qcow2" in reason and "no migration-file-drop-cache" in reason
    assert "not on shared storage" not in reason
    unknown = unsafe_refusal(disks, False, None, cfs, UNKNOWN_DROP) or ""
    assert "is unknown (cannot read libvirt's status /run/libvirt/qemu/g.xml: denied)" in unknown


def test_cache_modes_libvirt_accepts_without_the_capability() -> None:
    safe = [
        disk("vda", "/nfs/a", "none"),
        disk("vdb", "/nfs/b", "directsync"),
        disk("vdc", "/nfs/c", "writeback", shareable=True),
        disk("vdd", "/nfs/d", "writeback", readonly=True),
        disk("vde", "/gfs/e", "writeback"),  # coherent cluster file systems
        disk("vdf", "/ceph/f", "default"),
        disk("vdh", "/gluster/h", "unsafe"),
        disk("vdg", "/nfs/g", "writeback"),  # copied
    ]
    asked = []

    def ask() -> DropCache:
        asked.append(1)
        return DropCache(False)

    assert unsafe_refusal(safe, True, ("vdg",), cfs, ask) is None
    assert asked == []  # the capability is read only when a disk's verdict needs it


def test_a_block_device_with_a_host_cache_is_judged_by_the_capability_too() -> None:
    dev = [disk("vda", "/dev/mapper/x", "writeback", kind="block")]
    assert unsafe_refusal(dev, False, None, cfs, HAS_DROP) is None
    assert "vda (/dev/mapper/x, cache writeback)" in (
        unsafe_refusal(dev, False, None, cfs, NO_DROP) or ""
    )
    nocache = [disk("vda", "/dev/mapper/x", "none", kind="block")]
    assert unsafe_refusal(nocache, False, None, cfs, NO_DROP) is None


def test_local_storage_is_refused_before_the_cache_mode_is_judged() -> None:
    disks = [disk("vda", "/var/a", "none"), disk("vdb", "/nfs/b", "writeback")]
    reason = unsafe_refusal(disks, False, None, cfs, NO_DROP) or ""
    local, cached = reason.split("; ", 1)
    assert "vda (/var/a, cache none) not copied and not on shared storage" in local
    assert "vdb (/nfs/b, cache writeback) on shared storage" in cached


STATUS = """<domstatus state='running' reason='booted' pid='42'>
  <qemuCaps>
    <flag name='kvm'/>
    {flag}
  </qemuCaps>
  <domain type='qemu'><name>g</name></domain>
</domstatus>"""


def test_the_capability_is_read_from_libvirts_status_record(tmp_path: Path) -> None:
    with_flag = STATUS.format(flag="<flag name='migration-file-drop-cache'/>")
    assert drop_cache_in(with_flag) == DropCache(True)
    assert drop_cache_in(STATUS.format(flag="")) == DropCache(False)
    assert drop_cache_in("<domstatus/>").present is None
    assert drop_cache_in("<domstatus").present is None
    (tmp_path / "g.xml").write_text(with_flag)
    assert drop_cache_of("g", tmp_path) == DropCache(True)
    missing = drop_cache_of("h", tmp_path)
    assert missing.present is None and f"{tmp_path}/h.xml" in (missing.problem or "")
    assert drop_cache_of("../g", tmp_path).present is None


def test_copied_disks_follow_libvirts_choice() -> None:
    d = {x.target: x for x in guest_disks(GUEST)}
    assert copied(d["vda"], True, None) and not copied(d["vda"], False, None)
    assert not copied(d["hdc"], True, None) and not copied(d["vdd"], True, None)
    assert copied(d["vdb"], True, ("vdb",)) and not copied(d["vda"], True, ("vdb",))


def test_migrate_disks_must_name_copyable_disks() -> None:
    disks = guest_disks(GUEST)
    assert chosen_refusal(disks, None) is None
    assert chosen_refusal(disks, ("vda", "vdc")) is None
    reason = chosen_refusal(disks, ("vda", "hdc", "vdz"))
    assert reason == "--migrate-disks: no writable file disk hdc, vdz (copyable: vda, vdb, vdc)"


def test_an_uncopied_disk_must_be_seen_alike_by_the_destination() -> None:
    vda = guest_disks(GUEST)[0]
    assert unseen_refusal(vda, 1 << 30, PathView("file", 1 << 30), "b") is None
    assert unseen_refusal(vda, None, PathView("file", 5), "b") is None  # no size: path, kind
    assert "b does not see vda" in (unseen_refusal(vda, 1, PathView(None), "b") or "")
    assert "as block" in (unseen_refusal(vda, 1, PathView("block", 1), "b") or "")
    assert unseen_refusal(vda, 2, PathView("file", 1), "b") == (
        "b sees vda (/var/lib/libvirt/images/a.qcow2) with 1 bytes, the source with 2"
    )
    assert "cannot read" in (unseen_refusal(vda, 2, PathView("file", problem="x"), "b") or "")


def test_room_counts_full_capacity_per_file_system() -> None:
    mib = 1 << 20
    assert room_refusal([Room("/img", 100 * mib, 100 * mib)], "b") is None
    assert room_refusal([Room("/img", 99 * mib, 100 * mib), Room("/o", 9, 1)], "b") == (
        "b: /img has 99 MiB free, the images need 100 MiB"
    )


def test_cpu_request_reads_what_compare_hypervisor_cpu_needs() -> None:
    req = cpu_request(GUEST)
    assert (req.virt_type, req.arch, req.machine) == ("qemu", "x86_64", "pc-i440fx-7.2")
    assert req.emulator == "/usr/bin/qemu-system-x86_64"
    assert req.mode == "custom" and req.cpu_xml is not None and "aes" in req.cpu_xml
    passthrough = GUEST.replace(
        GUEST[GUEST.index("<cpu ") : GUEST.index("</cpu>") + 6], "<cpu mode='host-passthrough'/>"
    )
    assert cpu_request(passthrough).mode == "host-passthrough"
    bare = GUEST.replace(GUEST[GUEST.index("<cpu ") : GUEST.index("</cpu>") + 6], "")
    assert cpu_request(bare).mode == "none"


HUGE = GUEST.replace("<vcpu>", "<memoryBacking><hugepages/></memoryBacking><vcpu>", 1).replace(
    "<memory unit='MiB'>64</memory>", "<memory unit='GiB'>1</memory>"
)


def test_hugepages_in_the_hosts_default_size() -> None:
    (need,) = hugepage_needs(HUGE)
    assert need.page_kib is None and need.memory_kib == 1024 * 1024
    need = resolved(need, 2048)
    assert need.pages == 512
    assert hugepage_refusal(need, 512, "b") is None
    assert hugepage_refusal(need, 100, "b") == (
        "b has 100 free 2048 KiB hugepages, the guest needs 512"
    )
    assert hugepage_needs(GUEST) == []


def test_hugepages_of_named_sizes_per_numa_cell() -> None:
    xml = HUGE.replace(
        "<hugepages/>",
        "<hugepages><page size='1' unit='G' nodeset='0'/>"
        "<page size='2048' unit='KiB' nodeset='1'/></hugepages>",
    ).replace(
        "</cpu>",
        "<numa><cell id='0' cpus='0' memory='512' unit='MiB'/>"
        "<cell id='1' cpus='0' memory='512' unit='MiB'/></numa></cpu>",
    )
    needs = {n.page_kib: n.pages for n in hugepage_needs(xml)}
    assert needs == {2048: 256, 1024 * 1024: 1}


def test_default_page_size_from_meminfo() -> None:
    assert default_page_kib("MemTotal: 1 kB\nHugepagesize:    1048576 kB\n") == 1048576
    assert default_page_kib("MemTotal: 1 kB\n") == 2048


def test_every_check_runs_and_each_gets_a_verdict() -> None:
    found = verdicts("b", [("one", lambda: "no room"), ("two", lambda: None)])
    assert [(v.check, v.passed, v.reason) for v in found] == [
        ("one", False, "no room"),
        ("two", True, None),
    ]


def spec(**kw: object) -> MigrationSpec:
    return MigrationSpec.model_validate({"domain": "g", "src": "a", "dst": "b", **kw})


def test_migrate_disks_and_unsafe_reach_libvirt() -> None:
    s = spec(copy_storage="all", migrate_disks=["vda"], unsafe=True)
    call = build_call(
        s, Handoff(dconnuri="qemu+tcp://b/system"), effective_policy(Settings(), s).values
    )
    assert call.flags & libvirt.VIR_MIGRATE_UNSAFE
    assert call.params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] == ["vda"]
    assert not build_call(spec(), Handoff(), effective_policy(Settings(), spec()).values).flags & (
        libvirt.VIR_MIGRATE_UNSAFE
    )


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"migrate_disks": ["vda"]}, "needs --copy-storage"),
        ({"copy_storage": "all", "migrate_disks": ["vda", "vda"]}, "names a disk twice"),
        ({"copy_storage": "all", "migrate_disks": ["../x"]}, "pattern"),
        ({"copy_storage": "all", "migrate_disks": []}, "at least 1"),
        ({"offline": True, "live": False, "persistent": True, "unsafe": True}, "--unsafe"),
    ],
)
def test_bad_disk_options_are_refused(fields: dict[str, object], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        spec(**fields)


def test_a_dry_runs_chain_never_reaches_perform() -> None:
    assert Phase.PERFORM not in DRY_RUN_PHASES
    assert DRY_RUN_PHASES == (Phase.SOURCE_PREFLIGHT, Phase.DESTINATION_PREPARE)


TCG = HostCpu(virt_type="qemu", arch="x86_64", host_model=True, maximum=True)


def test_maximum_guests_need_maximum_and_the_very_same_host_cpu() -> None:
    """TCG offers `maximum` and not host-passthrough (libvirt 9.0's domain capabilities)."""
    other = TCG.model_copy(update={"features": frozenset({"aes"})})
    maximum = guest_cpu_sig("qemu", "<cpu mode='maximum'/>", TCG.signature)
    passthrough = guest_cpu_sig("qemu", "<cpu mode='host-passthrough'/>", TCG.signature)
    assert cpu_refusal(maximum, TCG) is None
    assert cpu_refusal(maximum, other) == (
        "cannot run the guest's CPU model: maximum needs a host CPU identical to the source's"
    )
    assert cpu_refusal(passthrough, TCG) == (
        "cannot run the guest's CPU model: host-passthrough is not supported there"
    )


def test_path_view_and_rooms_read_this_hosts_files(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(b"\0" * 4096)
    disk = GuestDisk("vda", "file", "disk", str(image), "raw", "none", False, False)
    assert path_view(disk) == PathView("file", 4096)
    gone = GuestDisk("vdb", "file", "disk", str(tmp_path / "gone.img"), "raw", "none", False, False)
    assert path_view(gone) == PathView(None)
    # Targets in a directory not made yet are measured where they would be made: tmp_path.
    (room,) = rooms([(str(tmp_path / "new" / "x.qcow2"), 10), (str(tmp_path / "y.raw"), 5)])
    assert room.where == str(tmp_path) and room.need == 15 and room.free > 0


def test_libvirts_incompatibility_message_is_kept_short() -> None:
    many = ", ".join(f"f{i}" for i in range(9))
    prefix = "the CPU is incompatible with host CPU: "
    message = f"{prefix}Host CPU does not provide required features: {many}"
    assert shortened(message) == (
        "Host CPU does not provide required features: f0, f1, f2, f3, f4 ..."
    )
    assert shortened("something else") == "something else"
