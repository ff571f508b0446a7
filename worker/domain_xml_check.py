"""A job's `--xml` / `--persistent-xml`, checked again on the worker against the guest as the
source's libvirtd shows it, with the destination's storage directories from the registry.

The producer checked their form; a job record is not trusted, so each worker that acts on
them (the source before it moves anything and again right before the call, the destination
before it creates anything) runs jobs/domain_xml.py `check_against_guest` itself.
"""

from __future__ import annotations

import libvirt

from jobs.domain_xml import DomainXMLError, XMLCheck, check_against_guest
from jobs.spec import MigrationSpec
from worker.libvirt_host import Domain
from worker.phase_errors import PhaseFailed

# What a user edits: `virsh dumpxml --migratable` (no live-only state, no default devices).
LIVE_FLAGS = libvirt.VIR_DOMAIN_XML_MIGRATABLE
PERSISTENT_FLAGS = libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE


def checked_xml(spec: MigrationSpec, dom: Domain, storage_dirs: list[str]) -> XMLCheck:
    """What the job's XML changes (disk moves), or PhaseFailed with the first thing refused.

    `--xml` is compared with the running guest, `--persistent-xml` with its persistent
    definition (the live one for a transient guest), the source's libvirtd saying both.
    """
    if spec.dest_xml is None and spec.persist_xml is None:
        return XMLCheck()
    try:
        checked = XMLCheck()
        if spec.dest_xml is not None:
            current = dom.XMLDesc(LIVE_FLAGS)
            checked = check_against_guest(
                spec.dest_xml, current, "--xml", spec.arrives_as, storage_dirs
            )
        if spec.persist_xml is not None:
            defined = dom.XMLDesc(PERSISTENT_FLAGS)
            check_against_guest(
                spec.persist_xml, defined, "--persistent-xml", spec.arrives_as, storage_dirs
            )
    except DomainXMLError as exc:
        raise PhaseFailed(f"refused: {exc}; nothing moved") from None
    return checked
