"""What a producer asks for: the migration spec, validated before anything is queued.

The same model parses every job record on the worker side again (unknown fields rejected),
so a request that did not come through a validating producer never reaches libvirt.

Mode words follow virsh and libvirt's migration guide: control flow `p2p` (managed
peer-to-peer, default), `direct` (managed direct: the source host's worker is the libvirt
client of both daemons) or `unmanaged` (unmanaged direct: the hypervisor does it); transport
`native` (default) or `tunnelled` (through the libvirtd connection, peer-to-peer only).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, model_validator

# Re-exported: address and URI checks were defined here before they moved down a layer.
from config.addresses import MAX_PORT as MAX_PORT
from config.addresses import MAX_SHOWN_CHARS
from config.addresses import IPAddress as IPAddress
from config.addresses import check_address as check_address
from config.addresses import parse_ip as parse_ip
from config.addresses import shown as shown
from config.policy_model import PolicyName
from jobs.compression import CompressionOptions
from jobs.migration_uri import MIGRATION_URI_SCHEMES as MIGRATION_URI_SCHEMES
from jobs.migration_uri import MigrationURI as MigrationURI
from jobs.migration_uri import check_migration_uri as check_migration_uri
from jobs.migration_uri import parse_migration_uri as parse_migration_uri
from jobs.request_fields import option_of
from jobs.spec_options import MAX_XML_CHARS, MIN_DISKS_PORT, option_problems

# A conservative subset of what libvirt accepts: no '/', no control characters, no spaces.
DOMAIN_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._+:@-]{0,199}$"
HOST_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
MAX_BANDWIDTH_MIB = 1_000_000
MAX_PARALLEL_CONNECTIONS = 64
MAX_COMPLETION_TIMEOUT_S = 86_400

# Strict: a name is a str, never bytes or anything else pydantic would turn into one.
DomainName = Annotated[str, Strict(), StringConstraints(pattern=DOMAIN_NAME_PATTERN)]
# A disk's target name as libvirt spells it (vda, sdb, hdc, vdaa...): what --migrate-disks names.
DISK_TARGET_PATTERN = r"^[a-z]{1,4}[a-z0-9]{1,8}$"
MAX_MIGRATE_DISKS = 64
DiskTarget = Annotated[str, Strict(), StringConstraints(pattern=DISK_TARGET_PATTERN)]
HostRef = Annotated[str, Strict(), StringConstraints(pattern=HOST_NAME_PATTERN)]
# A request's values are taken only as their own types (strict models): a flag only as a bool,
# a count only as an int (never a bool), a name only as a str, so `live='no'` or
# `bandwidth_mib=True` is refused instead of read as something the caller did not write.
# Lax are only what the CLI and a record's JSON spell otherwise: an enum's value as its word
# (`lax()`), a list of disks or hosts as a list (its items stay strict).
STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)


def lax(default: object = None) -> Any:
    """An enum field of a strict model: its value may come as its word."""
    return Field(default=default, strict=False)


class ControlFlow(StrEnum):
    P2P = "p2p"
    DIRECT = "direct"
    UNMANAGED = "unmanaged"


class Transport(StrEnum):
    NATIVE = "native"
    TUNNELLED = "tunnelled"


class CopyStorage(StrEnum):
    ALL = "all"
    INC = "inc"


class TimeoutAction(StrEnum):
    """What a live migration still running after its completion timeout is made to do.

    As virsh's --timeout-suspend / --timeout-postcopy and Nova's live_migration_timeout_action:
    a guest that dirties memory faster than the link carries it never converges by itself.
    """

    SUSPEND = "suspend"  # pause the guest: the rest is copied at once, it resumes on arrival
    POSTCOPY = "postcopy"  # switch to post-copy (needs --postcopy)
    ABORT = "abort"  # give up; the guest stays where it was


class MigrationSpec(BaseModel):
    model_config = STRICT

    domain: DomainName
    src: HostRef
    dst: HostRef
    live: bool = True
    offline: bool = False
    control: ControlFlow = lax(ControlFlow.P2P)
    transport: Transport = lax(Transport.NATIVE)
    # Scenarios "client to and peer2peer between two libvirtd": the worker also opens the
    # destination connection and calls virDomainMigrate3 with PEER2PEER.
    dest_connection: bool = False
    tls: bool = False
    persistent: bool = False
    undefine_source: bool = False
    force: bool = False
    suspend: bool = False
    dname: DomainName | None = None
    change_protection: bool = False
    abort_on_error: bool = False
    auto_converge: bool = False
    compressed: bool = False
    # Compression methods and levels (jobs/compression.py); naming methods compresses.
    compression: CompressionOptions | None = None
    postcopy: bool = False
    bandwidth_mib: int | None = Field(default=None, ge=1, le=MAX_BANDWIDTH_MIB)
    postcopy_bandwidth_mib: int | None = Field(default=None, ge=1, le=MAX_BANDWIDTH_MIB)
    # A named migration policy (config/policy_model.py); flags above override its fields.
    policy: PolicyName | None = None
    completion_timeout_s: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TIMEOUT_S)
    timeout_action: TimeoutAction | None = lax()  # with completion_timeout_s; suspend if unset
    parallel: int | None = Field(default=None, ge=2, le=MAX_PARALLEL_CONNECTIONS)
    copy_storage: CopyStorage | None = lax()
    migrate_uri: str | None = None
    listen_address: str | None = None
    # Pre-checks (docs/prechecks.md): accept a disk libvirt deems unsafe to migrate
    # (VIR_MIGRATE_UNSAFE); copy only these disks (VIR_MIGRATE_PARAM_MIGRATE_DISKS); run the
    # checks only (a dry run ends `checked` or `failed` after the destination's checks).
    unsafe: bool = False
    migrate_disks: tuple[DiskTarget, ...] | None = Field(
        default=None, min_length=1, max_length=MAX_MIGRATE_DISKS, strict=False
    )
    dry_run: bool = False
    # --xml, --persistent-xml, --tls-destination, --disks-port, --disks-uri (jobs/spec_options.py)
    dest_xml: str | None = Field(default=None, max_length=MAX_XML_CHARS)
    persist_xml: str | None = Field(default=None, max_length=MAX_XML_CHARS)
    tls_destination: str | None = None
    disks_port: int | None = Field(default=None, ge=MIN_DISKS_PORT, le=MAX_PORT)
    disks_uri: str | None = None

    @model_validator(mode="after")
    def _coherent(self) -> MigrationSpec:
        problems = combination_problems(self) + option_problems(self)
        if problems:
            raise ValueError(problems[0])
        if self.migrate_uri is not None:
            check_migration_uri(self.migrate_uri)
        if self.listen_address is not None:
            try:
                check_address(self.listen_address)
            except ValueError as exc:
                raise ValueError(f"--listen-address: {exc}") from None
        return self

    @property
    def on_timeout(self) -> TimeoutAction | None:
        """The action at the completion timeout (suspend unless told), None without one."""
        if self.completion_timeout_s is None:
            return None
        return self.timeout_action or TimeoutAction.SUSPEND

    @property
    def arrives_as(self) -> str:
        """The name the domain has on the destination."""
        return self.dname or self.domain


def combination_problems(s: MigrationSpec) -> list[str]:
    """Requests libvirt would reject (or that would silently not do what was asked)."""
    tunnelled = s.transport is Transport.TUNNELLED
    problems = []
    if s.src == s.dst:
        problems.append(f"source and destination are the same host ({s.src})")
    if tunnelled and s.control is not ControlFlow.P2P:
        problems.append(f"--tunnelled needs peer-to-peer (--p2p); {s.control.value} cannot tunnel")
    if s.dest_connection and s.control is not ControlFlow.P2P:
        problems.append(
            "--dest-connection is the peer-to-peer variant of virDomainMigrate; it goes with --p2p"
        )
    if s.dest_connection:
        for flag, on in (
            ("--migrate-uri", s.migrate_uri),
            ("--listen-address", s.listen_address),
            ("--parallel", s.parallel),
            ("--copy-storage", s.copy_storage),
            ("--postcopy-bandwidth", s.postcopy_bandwidth_mib),
            ("--comp-methods", s.compression),
        ):
            if on:
                problems.append(f"{flag} cannot go through virDomainMigrate2 (--dest-connection)")
    if tunnelled and s.migrate_uri:
        problems.append("--migrate-uri has no effect when tunnelled (no hypervisor connection)")
    if tunnelled and s.listen_address:
        problems.append("--listen-address has no effect when tunnelled")
    if tunnelled and s.postcopy:
        problems.append("--postcopy cannot be tunnelled (libvirt refuses it)")
    if tunnelled and s.postcopy_bandwidth_mib:
        problems.append("--postcopy-bandwidth cannot be tunnelled (post-copy is not)")
    if tunnelled and s.parallel:
        problems.append("--parallel cannot be tunnelled (libvirt refuses it)")
    if tunnelled and s.tls:
        # libvirt's tunnel feeds the destination's QEMU one way (a pipe), and the TLS handshake
        # needs both: QEMU fails it after the destination has started (lab, libvirt 9.0).
        problems.append(
            "--tls cannot be tunnelled: the tunnel carries the stream one way and QEMU's TLS "
            "handshake needs both (encrypt a tunnelled migration with qemu+tls:// peer URIs)"
        )
    if s.offline:
        if s.live:
            problems.append("--offline and --live exclude each other")
        if not s.persistent:
            problems.append("--offline moves only the definition: it needs --persistent")
        for flag, on in (
            ("--suspend", s.suspend),
            ("--postcopy", s.postcopy),
            ("--auto-converge", s.auto_converge),
            ("--compressed", s.compressed),
            ("--comp-methods", s.compression),
            ("--parallel", s.parallel),
            ("--copy-storage", s.copy_storage),
            ("--bandwidth", s.bandwidth_mib),
            ("--postcopy-bandwidth", s.postcopy_bandwidth_mib),
            ("--policy", s.policy),
            ("--tunnelled", tunnelled),
            ("--tls", s.tls),
            ("--migrate-uri", s.migrate_uri),
            ("--listen-address", s.listen_address),
            ("--unsafe", s.unsafe),
        ):
            if on:
                problems.append(f"{flag} does not apply to an offline migration")
    if s.force and not s.undefine_source:  # the destination reads it only with that flag
        problems.append(
            "--force only goes with --undefine-source (it lets that leave no definition)"
        )
    if s.migrate_disks is not None and s.copy_storage is None:
        problems.append("--migrate-disks chooses disks to copy: it needs --copy-storage")
    if s.migrate_disks is not None and len(set(s.migrate_disks)) != len(s.migrate_disks):
        problems.append("--migrate-disks names a disk twice")
    if s.postcopy and not s.live:
        problems.append("--postcopy needs --live")
    if s.postcopy and s.suspend:
        problems.append("--postcopy cannot go with --suspend (libvirt refuses it)")
    if s.timeout_action is not None and s.completion_timeout_s is None:
        problems.append("--timeout-action needs --completion-timeout")
    if s.completion_timeout_s is not None and not s.live:
        problems.append("--completion-timeout needs --live (only a live migration can stall)")
    if s.timeout_action is TimeoutAction.POSTCOPY and not s.postcopy:
        problems.append("--timeout-action postcopy needs --postcopy")
    if s.auto_converge and not s.live:
        problems.append("--auto-converge needs --live")
    if s.control is ControlFlow.UNMANAGED and (s.persistent or s.undefine_source):
        problems.append(
            "unmanaged migration leaves configuration to the hypervisor: "
            "--persistent and --undefine-source need --p2p or --direct"
        )
    return problems


def first_error(exc: Exception) -> str:
    """One line out of a pydantic ValidationError (or any exception), naming the CLI option
    of the field (jobs/request_fields.py; the Python API's callers read the same names, as
    its fields are the options') and quoting the value it was given cut short."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        loc = err.get("loc", ())
        msg = re.sub(r"^Value error, ", "", str(err.get("msg", ""))).partition("\n")[0]
        if not loc or msg.startswith("--"):  # a rule's own message names its options
            return msg
        option = option_of(loc)
        value = err.get("input")
        if err.get("type") == "string_pattern_mismatch":
            return f"invalid {option} {_quoted(value)}"
        if isinstance(value, str | int | float):
            return f"{option} {_quoted(value)}: {msg}"
        return f"{option}: {msg}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _quoted(value: object) -> str:
    """A refused value as an error quotes it: at most a line's worth of it."""
    if isinstance(value, str):
        return shown(value)
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return "(a number too long to show)"
    return text if len(text) <= MAX_SHOWN_CHARS else f"{text[:MAX_SHOWN_CHARS]}..."


OFFLINE_MODE = "offline"


def migration_mode(spec: MigrationSpec) -> str:
    """The job's mode in one word, for metrics' `mode` label and events' `migration_mode`:
    `offline`, else `{control}-{transport}` (`p2p-native`, `p2p-tunnelled`, `direct-native`,
    `unmanaged-native`)."""
    if spec.offline:
        return OFFLINE_MODE
    return f"{spec.control.value}-{spec.transport.value}"
