"""From a migration spec and the destination's hand-off to the exact libvirt call.

Pure up to `invoke` (which makes the call), so docs/modes.md can point at one function for
every mode and unit tests can check every flag without a hypervisor. The mapping, per
libvirt's guide:

    control    transport  dest_connection  API             flags
    p2p        native     no               migrateToURI3   PEER2PEER
    p2p        tunnelled  no               migrateToURI3   PEER2PEER | TUNNELLED
    p2p        native     yes              migrate2(dconn) PEER2PEER
    p2p        tunnelled  yes              migrate2(dconn) PEER2PEER | TUNNELLED
    direct     native     -                migrate3(dconn) -
    unmanaged  native     -                migrateToURI3   - (dconnuri None; the HV URI)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libvirt

from config.policy_model import Compression, MigrationPolicy
from config.settings import Host
from jobs.record import Handoff
from jobs.spec import ControlFlow, CopyStorage, MigrationSpec, Transport
from jobs.targets import migration_uri_problem
from jobs.validation import listen_address_problem
from worker.compression_support import compression_params
from worker.libvirt_host import Domain, Opener, checked_uri
from worker.migration_options import option_params, shown_params


class UnsafeTarget(ValueError):
    """A migration URI the registry does not allow for the destination; one line."""


@dataclass(frozen=True)
class MigrationCall:
    """One libvirt migration call: migrateToURI3(dconnuri, ...), migrate3 or migrate2(dconn, ...).

    virDomainMigrate3 refuses PEER2PEER ("use virDomainMigrateToURI3"), so the guide's
    "client to and peer2peer between two libvirtd" scenarios go through virDomainMigrate2,
    which takes the destination libvirt URI from the connection and picks the hypervisor URI
    itself (its only parameters are the new name and the bandwidth).
    """

    api: str
    dconnuri: str | None  # migrateToURI3's first argument
    dest_connection_uri: str | None  # for migrate3: what the worker opens as dconn
    params: dict[str, Any]
    flags: int

    def describe(self) -> dict[str, Any]:
        return {
            "api": self.api,
            "dconnuri": self.dconnuri,
            "dest_connection": self.dest_connection_uri,
            "params": shown_params(self.params),
            "flags": flag_names(self.flags),
        }


_FLAGS = {
    "VIR_MIGRATE_LIVE": libvirt.VIR_MIGRATE_LIVE,
    "VIR_MIGRATE_PEER2PEER": libvirt.VIR_MIGRATE_PEER2PEER,
    "VIR_MIGRATE_TUNNELLED": libvirt.VIR_MIGRATE_TUNNELLED,
    "VIR_MIGRATE_PERSIST_DEST": libvirt.VIR_MIGRATE_PERSIST_DEST,
    "VIR_MIGRATE_UNDEFINE_SOURCE": libvirt.VIR_MIGRATE_UNDEFINE_SOURCE,
    "VIR_MIGRATE_PAUSED": libvirt.VIR_MIGRATE_PAUSED,
    "VIR_MIGRATE_NON_SHARED_DISK": libvirt.VIR_MIGRATE_NON_SHARED_DISK,
    "VIR_MIGRATE_NON_SHARED_INC": libvirt.VIR_MIGRATE_NON_SHARED_INC,
    "VIR_MIGRATE_CHANGE_PROTECTION": libvirt.VIR_MIGRATE_CHANGE_PROTECTION,
    "VIR_MIGRATE_COMPRESSED": libvirt.VIR_MIGRATE_COMPRESSED,
    "VIR_MIGRATE_ABORT_ON_ERROR": libvirt.VIR_MIGRATE_ABORT_ON_ERROR,
    "VIR_MIGRATE_AUTO_CONVERGE": libvirt.VIR_MIGRATE_AUTO_CONVERGE,
    "VIR_MIGRATE_OFFLINE": libvirt.VIR_MIGRATE_OFFLINE,
    "VIR_MIGRATE_POSTCOPY": libvirt.VIR_MIGRATE_POSTCOPY,
    "VIR_MIGRATE_POSTCOPY_RESUME": libvirt.VIR_MIGRATE_POSTCOPY_RESUME,
    "VIR_MIGRATE_TLS": libvirt.VIR_MIGRATE_TLS,
    "VIR_MIGRATE_PARALLEL": libvirt.VIR_MIGRATE_PARALLEL,
    "VIR_MIGRATE_UNSAFE": libvirt.VIR_MIGRATE_UNSAFE,
}


# What virDomainMigrate2 can carry besides flags (spec validation refuses the rest).
MIGRATE2_PARAMS = (
    libvirt.VIR_MIGRATE_PARAM_DEST_NAME,
    libvirt.VIR_MIGRATE_PARAM_BANDWIDTH,
    libvirt.VIR_MIGRATE_PARAM_DEST_XML,
)


def flag_names(flags: int) -> list[str]:
    return [name for name, bit in _FLAGS.items() if flags & bit]


def _flags(spec: MigrationSpec, policy: MigrationPolicy) -> int:
    chosen = {
        "VIR_MIGRATE_LIVE": spec.live,
        "VIR_MIGRATE_PEER2PEER": spec.control is ControlFlow.P2P,
        "VIR_MIGRATE_TUNNELLED": spec.transport is Transport.TUNNELLED,
        "VIR_MIGRATE_PERSIST_DEST": spec.persistent,
        "VIR_MIGRATE_UNDEFINE_SOURCE": spec.undefine_source,
        "VIR_MIGRATE_PAUSED": spec.suspend,
        "VIR_MIGRATE_NON_SHARED_DISK": spec.copy_storage is CopyStorage.ALL,
        "VIR_MIGRATE_NON_SHARED_INC": spec.copy_storage is CopyStorage.INC,
        "VIR_MIGRATE_CHANGE_PROTECTION": spec.change_protection,
        "VIR_MIGRATE_COMPRESSED": policy.compression is not Compression.NONE,
        "VIR_MIGRATE_ABORT_ON_ERROR": spec.abort_on_error,
        "VIR_MIGRATE_AUTO_CONVERGE": policy.auto_converge,
        "VIR_MIGRATE_OFFLINE": spec.offline,
        "VIR_MIGRATE_POSTCOPY": policy.allow_postcopy,
        "VIR_MIGRATE_TLS": spec.tls,
        "VIR_MIGRATE_PARALLEL": policy.parallel_connections > 1,
        "VIR_MIGRATE_UNSAFE": spec.unsafe,
    }
    flags = 0
    for name, on in chosen.items():
        if on:
            flags |= _FLAGS[name]
    return flags


def _params(spec: MigrationSpec, handoff: Handoff, policy: MigrationPolicy) -> dict[str, Any]:
    params: dict[str, Any] = {}
    # Tunnelled data goes through libvirtd: a hypervisor URI would be meaningless there.
    if handoff.migrate_uri and spec.transport is Transport.NATIVE:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = handoff.migrate_uri
    if handoff.listen_address and spec.transport is Transport.NATIVE:
        params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = handoff.listen_address
    if spec.dname:
        params[libvirt.VIR_MIGRATE_PARAM_DEST_NAME] = spec.dname
    if spec.migrate_disks:
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(spec.migrate_disks)
    if policy.bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = policy.bandwidth_mib
    if policy.allow_postcopy and policy.postcopy_bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] = policy.postcopy_bandwidth_mib
    if policy.parallel_connections > 1:
        params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = policy.parallel_connections
    if spec.compression is not None:  # the job's methods and levels, exactly
        params.update(compression_params(spec.compression))
    elif policy.compression not in (Compression.NONE, Compression.XBZRLE):
        params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = policy.compression.value
    if policy.auto_converge:
        params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = policy.auto_converge_initial
        params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = policy.auto_converge_increment
    params |= option_params(spec)
    return params


def handoff_for(spec: MigrationSpec, dst: Host) -> Handoff:
    """The hand-off toward `dst` (its registry entry): its peer URI, and the migration URI the
    spec names (only toward one of its registry addresses) or its `migration_address`."""
    if spec.disks_uri is not None:
        problem = migration_uri_problem(spec.disks_uri, dst, "--disks-uri")
        if problem is not None:
            raise UnsafeTarget(problem)
    if spec.transport is not Transport.NATIVE:
        return Handoff(dconnuri=dst.peer_uri, migrate_uri=None, listen_address=None)
    if spec.migrate_uri is not None:
        problem = migration_uri_problem(spec.migrate_uri, dst)
        if problem is not None:
            raise UnsafeTarget(problem)
    if spec.listen_address is not None:  # checked by the producer; again where it is used
        problem = listen_address_problem(spec, dst)
        if problem is not None:
            raise UnsafeTarget(problem)
    migrate_uri = spec.migrate_uri or f"tcp://{dst.migration_address}"
    return Handoff(
        dconnuri=dst.peer_uri, migrate_uri=migrate_uri, listen_address=spec.listen_address
    )


def build_call(spec: MigrationSpec, handoff: Handoff, policy: MigrationPolicy) -> MigrationCall:
    """The call for `spec` run under `policy` (the effective one, jobs/policy_choice.py:
    the job's flags are already in it)."""
    flags, params = _flags(spec, policy), _params(spec, handoff, policy)
    if spec.dest_connection:
        legacy = {k: v for k, v in params.items() if k in MIGRATE2_PARAMS}
        return MigrationCall("migrate2", None, handoff.dconnuri, legacy, flags)
    if spec.control is ControlFlow.DIRECT:
        return MigrationCall("migrate3", None, handoff.dconnuri, params, flags)
    if spec.control is ControlFlow.UNMANAGED:
        # No destination libvirtd at all: the hypervisor URI is the only address.
        return MigrationCall("migrateToURI3", None, None, params, flags)
    return MigrationCall("migrateToURI3", handoff.dconnuri, None, params, flags)


def invoke(dom: Domain, call: MigrationCall, reach: Opener) -> None:
    """Make the libvirt call; managed direct and virDomainMigrate2 need a destination conn.

    That conn comes from `reach` (the seam's LibvirtHost.reach): opened within the peer
    timeout, against the registry's allowlist, and kept alive, so that a destination libvirtd
    that stops answering mid-migration (frozen, cut off) fails the call within that bound,
    as libvirt fails a peer-to-peer one, instead of holding this thread and the job for
    ever. Unreachable: LibvirtUnavailable, before anything moved.
    """
    if call.api == "migrateToURI3":
        dconnuri = None if call.dconnuri is None else checked_uri(call.dconnuri)
        dom.migrateToURI3(dconnuri, call.params, call.flags)
        return
    assert call.dest_connection_uri is not None
    dconn = reach(call.dest_connection_uri)
    try:
        if call.api == "migrate3":
            dom.migrate3(dconn, call.params, call.flags)
        else:
            dname = call.params.get(libvirt.VIR_MIGRATE_PARAM_DEST_NAME)
            bandwidth = call.params.get(libvirt.VIR_MIGRATE_PARAM_BANDWIDTH, 0)
            dxml = call.params.get(libvirt.VIR_MIGRATE_PARAM_DEST_XML)
            dom.migrate2(dconn, dxml, call.flags, dname, None, bandwidth)
    finally:
        dconn.close()


def resume_call(call: MigrationCall) -> MigrationCall:
    """The same call again, to resume a post-copy migration that failed (virsh migrate
    --postcopy --postcopy-resume): libvirt reconnects the stream and goes on copying."""
    flags = call.flags | libvirt.VIR_MIGRATE_POSTCOPY | libvirt.VIR_MIGRATE_POSTCOPY_RESUME
    return MigrationCall(call.api, call.dconnuri, call.dest_connection_uri, call.params, flags)
