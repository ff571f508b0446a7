"""The libvirt parameters of the spec's `--xml`, `--persistent-xml`, `--tls-destination`,
`--disks-port` and `--disks-uri` (worker/migration_call.py adds them to the call).

The values are the signed spec's, checked again on this worker before the call: the XML
against libvirt (worker/domain_xml_check.py), the disks URI against the registry
(worker/migration_call.py `handoff_for`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import libvirt

from jobs.spec import MigrationSpec

XML_PARAMS = (libvirt.VIR_MIGRATE_PARAM_DEST_XML, libvirt.VIR_MIGRATE_PARAM_PERSIST_XML)
# How many hex digits of an XML's SHA-256 an event shows in its place (enough to compare two).
DIGEST_HEX = 16


def option_params(spec: MigrationSpec) -> dict[str, Any]:
    """VIR_MIGRATE_PARAM_* for the options the spec sets (the rest are absent)."""
    chosen: dict[str, Any] = {
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: spec.dest_xml,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: spec.persist_xml,
        libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION: spec.tls_destination,
        libvirt.VIR_MIGRATE_PARAM_DISKS_PORT: spec.disks_port,
        libvirt.VIR_MIGRATE_PARAM_DISKS_URI: spec.disks_uri,
    }
    return {name: value for name, value in chosen.items() if value is not None}


def shown_params(params: dict[str, Any]) -> dict[str, Any]:
    """`params` for an event: an XML as its length and digest, not kilobytes of text."""
    shown = dict(params)
    for name in XML_PARAMS:
        if name in shown:
            text = str(shown[name])
            digest = hashlib.sha256(text.encode()).hexdigest()[:DIGEST_HEX]
            shown[name] = f"{len(text)} chars, sha256 {digest}"
    return shown
