"""From a migration spec and the destination's hand-off to the exact libvirt call.

Kept pure (no connection, no I/O) so that the mode table in docs/ can point at one function
and unit tests can check every flag without a hypervisor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libvirt

from jobs.spec import ControlFlow, MigrationSpec


@dataclass(frozen=True)
class Handoff:
    """What the destination's prepare phase tells the source: where to send the domain."""

    dconnuri: str
    migrate_uri: str | None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Handoff:
        return cls(dconnuri=str(raw["dconnuri"]), migrate_uri=raw.get("migrate_uri"))


@dataclass(frozen=True)
class MigrationCall:
    """`dom.migrateToURI3(dconnuri, params, flags)` for the managed peer-to-peer flow."""

    api: str
    dconnuri: str
    params: dict[str, Any]
    flags: int

    def describe(self) -> dict[str, Any]:
        return {
            "api": self.api,
            "dconnuri": self.dconnuri,
            "params": self.params,
            "flags": flag_names(self.flags),
        }


_FLAG_NAMES = {
    libvirt.VIR_MIGRATE_LIVE: "VIR_MIGRATE_LIVE",
    libvirt.VIR_MIGRATE_PEER2PEER: "VIR_MIGRATE_PEER2PEER",
    libvirt.VIR_MIGRATE_TUNNELLED: "VIR_MIGRATE_TUNNELLED",
    libvirt.VIR_MIGRATE_PERSIST_DEST: "VIR_MIGRATE_PERSIST_DEST",
    libvirt.VIR_MIGRATE_UNDEFINE_SOURCE: "VIR_MIGRATE_UNDEFINE_SOURCE",
    libvirt.VIR_MIGRATE_AUTO_CONVERGE: "VIR_MIGRATE_AUTO_CONVERGE",
}


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in _FLAG_NAMES.items() if flags & bit]


def build_call(spec: MigrationSpec, handoff: Handoff) -> MigrationCall:
    flags = 0
    if spec.live:
        flags |= libvirt.VIR_MIGRATE_LIVE
    if spec.persistent:
        flags |= libvirt.VIR_MIGRATE_PERSIST_DEST
    if spec.undefine_source:
        flags |= libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    if spec.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    params: dict[str, Any] = {}
    if handoff.migrate_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = handoff.migrate_uri
    if spec.bandwidth_mib is not None:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = spec.bandwidth_mib
    if spec.control is ControlFlow.P2P:
        flags |= libvirt.VIR_MIGRATE_PEER2PEER
    return MigrationCall(api="migrateToURI3", dconnuri=handoff.dconnuri, params=params, flags=flags)
