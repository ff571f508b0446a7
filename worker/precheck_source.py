"""The source's pre-checks, run in source_preflight on the guest's live XML from this host's
own libvirtd: the disks `--migrate-disks` names exist and can be copied, and no disk is one
libvirt deems unsafe to migrate (unless `--unsafe`). The file system a disk lies on is this
host's view (the worker runs in the host's mount namespace), as libvirt's own test is; whether
the guest's QEMU can drop its page cache is libvirt's record of the running guest here
(worker/drop_cache.py). The control flow is checked against this host's hypervisor driver,
as libvirt names it: a dry run must not say yes to a migration libvirt always refuses. With
`--tls`, the CA certificate this host's QEMU checks the destination's with
(worker/tls_facts.py).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable

from jobs.spec import ControlFlow, MigrationSpec
from worker.drop_cache import drop_cache_of
from worker.guest_disks import guest_disks
from worker.precheck import Check
from worker.precheck_storage import chosen_refusal, unsafe_refusal
from worker.storage_view import fs_type
from worker.tls_facts import tls_refusal

# libvirt's hypervisor drivers (`virConnectGetType`) that have no unmanaged direct migration:
# libvirt refuses it before asking the hypervisor ("direct migration is not supported by the
# source host"), live or not. QEMU's driver is the only one drover runs on.
NO_UNMANAGED_DIRECT = frozenset({"QEMU"})


def unmanaged_refusal(host: str, driver: str) -> str | None:
    """Why an unmanaged direct migration from `host`, whose libvirtd runs `driver`, cannot be
    made (None: libvirt will say when asked)."""
    if driver not in NO_UNMANAGED_DIRECT:
        return None
    return (
        f"unmanaged direct migration: {host}'s hypervisor driver ({driver}) has none (libvirt: "
        "direct migration is not supported by the source host); use --p2p or --direct"
    )


def source_checks(spec: MigrationSpec, domain_xml: str, driver: Callable[[], str]) -> list[Check]:
    """The checks for a migration of `spec` of the guest described by `domain_xml`, from a
    libvirtd whose hypervisor driver `driver()` names (asked only when a check needs it)."""
    checks: list[Check] = []
    if spec.control is ControlFlow.UNMANAGED:
        checks.append(("control_flow", lambda: unmanaged_refusal(spec.src, driver())))
    if spec.offline:
        return checks  # only the definition moves: no disk is opened on the destination
    if spec.tls:
        checks.append(("tls", lambda: tls_refusal(spec.src, destination=False)))
    disks = guest_disks(domain_xml)
    copy = spec.copy_storage is not None
    if spec.migrate_disks is not None:
        checks.append(("migrate_disks", lambda: chosen_refusal(disks, spec.migrate_disks)))
    if not spec.unsafe:
        name = ET.fromstring(domain_xml).findtext("name") or ""
        checks.append(
            (
                "disk_safety",
                lambda: unsafe_refusal(
                    disks, copy, spec.migrate_disks, fs_type, lambda: drop_cache_of(name)
                ),
            )
        )
    return checks
