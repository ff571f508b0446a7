"""The source's pre-checks, run in source_preflight on the guest's live XML from this host's
own libvirtd: the disks `--migrate-disks` names exist and can be copied, and no disk is one
libvirt deems unsafe to migrate (unless `--unsafe`). The file system a disk lies on is this
host's view (the worker runs in the host's mount namespace), as libvirt's own test is; whether
the guest's QEMU can drop its page cache is libvirt's record of the running guest here
(worker/drop_cache.py).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from jobs.spec import MigrationSpec
from worker.drop_cache import drop_cache_of
from worker.guest_disks import guest_disks
from worker.precheck import Check
from worker.precheck_storage import chosen_refusal, unsafe_refusal
from worker.storage_view import fs_type


def source_checks(spec: MigrationSpec, domain_xml: str) -> list[Check]:
    """The checks for a migration of `spec` of the guest described by `domain_xml`."""
    if spec.offline:
        return []  # only the definition moves: no disk is opened on the destination
    disks = guest_disks(domain_xml)
    copy = spec.copy_storage is not None
    checks: list[Check] = []
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
