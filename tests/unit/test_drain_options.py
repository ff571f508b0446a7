"""Compression methods and levels, and the options a drain gives its children: the spec's
validation (one line each), the libvirt parameters and flags, the planner's per-guest choice,
and the host's libvirt version check."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest
from pydantic import ValidationError

from config.settings import Settings
from jobs.compression import CompressionOptions
from jobs.evacuation_model import EvacuationSpec
from jobs.policy_choice import effective_policy
from jobs.record import Handoff
from jobs.spec import MigrationSpec, first_error
from schedules.records import EvacuationRequest
from worker.compression_support import unsupported
from worker.local_disks import local_disk_paths
from worker.migration_call import build_call, flag_names

HANDOFF = Handoff(
    dconnuri="qemu+tcp://10.0.0.2/system", migrate_uri="tcp://10.0.0.2", listen_address=None
)
LIBVIRT_9_0 = 9_000_000
LIBVIRT_9_4 = 9_004_000


def spec(**kw: object) -> MigrationSpec:
    return MigrationSpec.model_validate({"domain": "web01", "src": "a", "dst": "b", **kw})


def refusal(**kw: object) -> str:
    with pytest.raises(ValidationError) as caught:
        spec(**kw)
    return first_error(caught.value)


def call(s: MigrationSpec):  # type: ignore[no-untyped-def]
    return build_call(s, HANDOFF, effective_policy(Settings(), s).values)


def test_methods_and_levels_become_repeated_compression_params() -> None:
    s = spec(
        parallel=4,
        compression={"methods": ["xbzrle", "zstd"], "zstd_level": 7, "xbzrle_cache_mib": 64},
    )
    c = call(s)
    assert c.params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] == ["xbzrle", "zstd"]
    assert c.params["compression.zstd.level"] == 7
    assert c.params["compression.xbzrle.cache"] == 64 * 1024 * 1024
    assert {"VIR_MIGRATE_COMPRESSED", "VIR_MIGRATE_PARALLEL"} <= set(flag_names(c.flags))
    assert c.params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] == 4


def test_mt_tuning_is_passed_as_given() -> None:
    s = spec(compression={"methods": ["mt"], "mt_level": 1, "mt_threads": 2, "mt_dthreads": 3})
    params = call(s).params
    assert params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] == ["mt"]
    assert params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_MT_LEVEL] == 1
    assert params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_MT_THREADS] == 2
    assert params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_MT_DTHREADS] == 3


def test_plain_compressed_keeps_its_old_meaning() -> None:
    c = call(spec(compressed=True))
    assert "VIR_MIGRATE_COMPRESSED" in flag_names(c.flags)
    assert libvirt.VIR_MIGRATE_PARAM_COMPRESSION not in c.params  # hypervisor default: xbzrle


def test_a_policys_single_method_still_applies_when_the_job_names_none() -> None:
    settings = Settings.model_validate(
        {"policies": {"squeeze": {"compression": "zstd", "parallel_connections": 2}}}
    )
    s = spec(policy="squeeze")
    c = build_call(s, HANDOFF, effective_policy(settings, s).values)
    assert c.params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] == "zstd"


def test_the_jobs_methods_override_the_policys_and_say_so() -> None:
    settings = Settings.model_validate({"policies": {"squeeze": {"compression": "mt"}}})
    s = spec(policy="squeeze", compression={"methods": ["xbzrle"]})
    policy = effective_policy(settings, s)
    assert policy.values.compression.value == "xbzrle"
    assert "--comp-methods" in policy.sources["compression"]
    c = build_call(s, HANDOFF, policy.values)
    assert c.params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] == ["xbzrle"]


@pytest.mark.parametrize(
    ("compression", "extra", "says"),
    [
        ({"methods": ["lz4"]}, {}, "--comp-methods 'lz4': Input should be"),
        ({"methods": []}, {}, "names no method"),
        ({"methods": ["none"]}, {}, "'none' is not a method"),
        ({"methods": ["mt", "mt"]}, {}, "names mt twice"),
        ({"methods": ["zlib", "zstd"]}, {"parallel": 2}, "exclude each other"),
        ({"methods": ["xbzrle"], "zlib_level": 3}, {}, "--comp-zlib-level needs zlib"),
        ({"methods": ["xbzrle"], "mt_level": 3}, {}, "--comp-mt-level needs mt"),
        ({"methods": ["mt"], "xbzrle_cache_mib": 8}, {}, "--comp-xbzrle-cache needs xbzrle"),
        ({"methods": ["zlib"], "zlib_level": 10}, {"parallel": 2}, "less than or equal to 9"),
        ({"methods": ["zstd"], "zstd_level": 21}, {"parallel": 2}, "less than or equal to 20"),
        ({"methods": ["mt"], "mt_threads": 0}, {}, "greater than or equal to 1"),
        ({"methods": ["xbzrle"]}, {"offline": True, "live": False, "persistent": True}, "offline"),
        ({"methods": ["xbzrle"]}, {"dest_connection": True}, "virDomainMigrate2"),
    ],
)
def test_bad_compression_is_refused_in_one_line(
    compression: dict[str, object], extra: dict[str, object], says: str
) -> None:
    message = refusal(compression=compression, **extra)
    assert says in message and "\n" not in message


def test_zlib_and_zstd_need_parallel_connections() -> None:
    from config.settings import ConfigError

    s = spec(compression={"methods": ["zstd"]})
    with pytest.raises(ConfigError, match="zstd needs parallel_connections >= 2"):
        effective_policy(Settings(), s)


def test_the_host_libvirt_version_decides_what_is_refused() -> None:
    old = call(spec(parallel=2, compression={"methods": ["zlib"], "zlib_level": 1})).params
    said = unsupported(old, LIBVIRT_9_0, "lab1")
    assert said == (
        "libvirt 9.0.0 on lab1 does not support compression method zlib "
        "(needs libvirt >= 9.4.0); nothing moved"
    )
    assert unsupported(old, LIBVIRT_9_4, "lab1") is None
    mt = call(spec(compression={"methods": ["mt", "xbzrle"], "mt_level": 1})).params
    assert unsupported(mt, LIBVIRT_9_0, "lab1") is None
    policy_zstd = {libvirt.VIR_MIGRATE_PARAM_COMPRESSION: "zstd"}  # a policy's single method
    assert "zstd" in (unsupported(policy_zstd, LIBVIRT_9_0, "lab2") or "")


def drain(**kw: object) -> EvacuationSpec:
    return EvacuationSpec.model_validate({"host": "a", **kw})


FULL = {
    "tls": True,
    "copy_storage": "all",
    "parallel": 3,
    "compressed": True,
    "compression": {"methods": ["xbzrle", "mt"], "mt_level": 2},
    "bandwidth_mib": 50,
    "auto_converge": True,
}


def test_every_live_child_carries_the_drains_options() -> None:
    child = drain(**FULL).child("web01", "b", active=True, persistent=True, local_disks=True)
    assert child.tls and child.parallel == 3 and child.compressed
    assert child.copy_storage is not None and child.copy_storage.value == "all"
    assert child.compression == CompressionOptions.model_validate(FULL["compression"])
    assert child.bandwidth_mib == 50 and child.auto_converge
    flags = set(flag_names(call(child).flags))
    assert {"VIR_MIGRATE_TLS", "VIR_MIGRATE_NON_SHARED_DISK", "VIR_MIGRATE_PARALLEL"} <= flags


def test_copy_storage_goes_only_to_guests_with_local_disks() -> None:
    child = drain(**FULL).child("web01", "b", active=True, persistent=True, local_disks=False)
    assert child.copy_storage is None and child.tls


def test_an_offline_child_carries_none_and_a_local_disk_one_is_left_with_why() -> None:
    ev = drain(include_inactive=True, **FULL)
    offline = ev.child("web01", "b", active=False, persistent=True, local_disks=False)
    assert not offline.tls and offline.compression is None and offline.copy_storage is None
    why = ev.unplaceable(active=False, local_disks=True)
    assert why is not None and "offline" in why
    assert ev.unplaceable(active=True, local_disks=True) is None
    assert drain().unplaceable(active=False, local_disks=True) is None


def test_a_schedule_keeps_every_drain_option() -> None:
    request = EvacuationRequest.model_validate({"host": "a", **FULL})
    again = EvacuationSpec.model_validate(request.model_dump())
    assert again.child("d", "b", active=True, persistent=True, local_disks=True).tls
    assert again.compression == request.compression


def test_local_disks_are_the_writable_file_backed_ones() -> None:
    xml = """<domain><devices>
      <disk type='file' device='disk'><source file='/var/lib/libvirt/images/a.qcow2'/></disk>
      <disk type='file' device='cdrom'><source file='/iso/x.iso'/><readonly/></disk>
      <disk type='file' device='disk'><source file='/s/shared.img'/><shareable/></disk>
      <disk type='block' device='disk'><source dev='/dev/sdb'/></disk>
      <disk type='file' device='disk'><source file='/gluster/b.qcow2'/></disk>
    </devices></domain>"""

    def fs_type(path: str) -> str:
        return "fuse.glusterfs" if path.startswith("/gluster/") else "ext4"

    # A disk on shared storage is not copied by a --copy-storage drain: every host sees it.
    assert local_disk_paths(xml, fs_type) == ["/var/lib/libvirt/images/a.qcow2"]
    assert local_disk_paths(xml, lambda _: "ext4")[-1] == "/gluster/b.qcow2"


def test_the_tls_fact_reads_the_directory_qemu_conf_names(tmp_path: Path) -> None:
    from tests.support.tls_files import Certs
    from worker.tls_facts import SERVER_FILES, migration_cert_dir, migration_tls_ready

    assert migration_cert_dir("") == "/etc/pki/qemu"
    both = 'default_tls_x509_cert_dir = "/a"\nmigrate_tls_x509_cert_dir = "/b"\n'
    assert migration_cert_dir(both) == "/b"
    assert migration_cert_dir('#migrate_tls_x509_cert_dir = "/b"\n') == "/etc/pki/qemu"
    certs = tmp_path / "certs"
    certs.mkdir()
    conf = tmp_path / "qemu.conf"
    conf.write_text(f'default_tls_x509_cert_dir = "{certs}"\n')
    assert not migration_tls_ready(conf)
    for name in SERVER_FILES:
        (certs / name).write_text("x")
    assert not migration_tls_ready(conf)  # there, but junk (worker/tls_certs.py)
    Certs(tmp_path, exist_ok=True)
    assert migration_tls_ready(conf)


def test_the_planner_plans_local_disk_guests_and_leaves_offline_ones_with_why() -> None:
    from jobs.evacuation_model import Placement
    from worker.evacuation_plan import checked, child_spec
    from worker.placement import Estimate, Guest

    class Ev:
        spec = drain(copy_storage="all", include_inactive=True)

    estimate = Estimate(startup_s=2.0, mib_per_s=100.0)
    base = {"domain": "web01", "uuid": "u1", "memory_mib": 64, "destination": "b"}
    running = Placement.model_validate(
        base | {"active": True, "persistent": True, "local_disks": 1}
    )
    guest = Guest("web01", "u1", 64, True, True, local_disks=1)
    planned = checked(Settings(), Ev(), running, guest, estimate)  # type: ignore[arg-type]
    assert planned.destination == "b" and planned.reason is None
    child = child_spec(Ev(), planned)  # type: ignore[arg-type]
    assert child.copy_storage is not None and child.copy_storage.value == "all"
    off = running.model_copy(update={"active": False})
    left = checked(Settings(), Ev(), off, guest, estimate)  # type: ignore[arg-type]
    assert left.destination is None and left.reason is not None and "offline" in left.reason
    diskless = running.model_copy(update={"local_disks": 0})
    assert child_spec(Ev(), diskless).copy_storage is None  # type: ignore[arg-type]
