"""What a producer asks for: the migration spec, validated before anything is queued.

The same model parses every job record on the worker side again (unknown fields rejected),
so a request that did not come through a validating producer never reaches libvirt.

Mode words follow virsh and libvirt's migration guide: control flow `p2p` (managed
peer-to-peer, default), `direct` (managed direct: the source host's worker is the libvirt
client of both daemons) or `unmanaged` (unmanaged direct: the hypervisor does it); transport
`native` (default) or `tunnelled` (through the libvirtd connection, peer-to-peer only).
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated, NamedTuple, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

# A conservative subset of what libvirt accepts: no '/', no control characters, no spaces.
DOMAIN_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._+:@-]{0,199}$"
HOST_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
MAX_BANDWIDTH_MIB = 1_000_000
MAX_PARALLEL_CONNECTIONS = 64
MAX_COMPLETION_TIMEOUT_S = 86_400
MIGRATION_URI_SCHEMES = ("tcp", "rdma", "unix")
MAX_PORT = 65535
# An IPv6 scope id names an interface: Linux's IFNAMSIZ is 16 bytes with the NUL.
MAX_INTERFACE_NAME = 15
# Longest excerpt of a refused value quoted back in an error (the value may be megabytes).
MAX_SHOWN_CHARS = 80
# Python's `$` also matches before a trailing newline, so these patterns end in \Z instead;
# re.ASCII (or explicit [0-9] classes) because `\d` and `\w` match any Unicode digit or letter.
_DNS_NAME = re.compile(
    r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9][A-Za-z0-9-]{0,62})*\Z",
    re.ASCII,
)
_SCOPE_ID = re.compile(rf"^[A-Za-z0-9_.-]{{1,{MAX_INTERFACE_NAME}}}\Z", re.ASCII)
_NET_URI = re.compile(r"^(tcp|rdma)://(\[[^\[\]/?#@]*\]|[^/:?#@\[\]]+)(:([0-9]{1,5}))?/?\Z")
_UNIX_URI = re.compile(r"^unix://(/[A-Za-z0-9._/-]{1,200})\Z", re.ASCII)

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

DomainName = Annotated[str, StringConstraints(pattern=DOMAIN_NAME_PATTERN)]
HostRef = Annotated[str, StringConstraints(pattern=HOST_NAME_PATTERN)]


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


def shown(value: str) -> str:
    """`value` quoted for an error message, cut short: one readable line whatever came in."""
    if len(value) <= MAX_SHOWN_CHARS:
        return repr(value)
    return f"{value[:MAX_SHOWN_CHARS]!r}... ({len(value)} characters)"


def parse_ip(text: str) -> IPAddress | None:
    """`text` as an IP address, or None; an IPv6 scope id only as a plain interface name.

    `ipaddress` alone is too lenient for values that end up in QEMU and libvirt arguments:
    it takes anything after an IPv6 `%` (spaces, quotes, thousands of characters).
    """
    if not text.isascii():
        return None
    address, percent, scope = text.partition("%")
    try:
        if percent:
            if not _SCOPE_ID.match(scope):
                return None
            return ipaddress.IPv6Address(text)
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _scope_problem(text: str) -> str | None:
    """Why an IPv6 address with a scope id is refused, when the scope id is the reason."""
    address, percent, scope = text.partition("%")
    if percent and parse_ip(address) is not None and not _SCOPE_ID.match(scope):
        return (
            f"IPv6 scope id {shown(scope)} must be an interface name "
            f"([A-Za-z0-9_.-], at most {MAX_INTERFACE_NAME} characters)"
        )
    return None


def check_address(value: str) -> str:
    """An IP address or a DNS name: nothing that could carry a URI part or an option.

    Brackets hold an IPv6 address only (`[10.0.0.1]` is no form QEMU or libvirt agree on);
    ASCII only, so no look-alike digits or letters pass as an address.
    """
    if value.startswith("[") or value.endswith("]"):
        inner = value[1:-1] if value.startswith("[") and value.endswith("]") else ""
        ip = parse_ip(inner)
        if ip is None or ip.version != 6:
            problem = _scope_problem(inner)
            raise ValueError(problem or f"brackets hold an IPv6 address only, not {shown(value)}")
        return value
    if parse_ip(value) is not None:
        return value
    problem = _scope_problem(value)
    if problem:
        raise ValueError(problem)
    if not _DNS_NAME.match(value):
        raise ValueError(f"not an IP address or host name: {shown(value)}")
    return value


class MigrationURI(NamedTuple):
    """The parts of a checked migration URI: `host` for tcp/rdma, `path` for unix."""

    scheme: str
    host: str | None = None
    port: int | None = None
    path: str | None = None


def parse_migration_uri(value: str) -> MigrationURI:
    """tcp://HOST[:PORT], rdma://HOST[:PORT] or unix:///PATH; no user, query or fragment.

    HOST is returned as written (brackets stripped from an IPv6 address); ValueError, one
    line, for anything else.
    """
    net = _NET_URI.match(value)
    if net:
        host = net.group(2)
        try:
            check_address(host)
        except ValueError as exc:
            raise ValueError(f"migration URI {shown(value)}: {exc}") from None
        port = net.group(4)
        if port is not None and not 1 <= int(port) <= MAX_PORT:
            raise ValueError(f"port out of range in migration URI {shown(value)}")
        bare = host[1:-1] if host.startswith("[") else host
        return MigrationURI(net.group(1), host=bare, port=int(port) if port else None)
    unix = _UNIX_URI.match(value)
    if unix and ".." not in unix.group(1).split("/"):
        return MigrationURI("unix", path=unix.group(1))
    raise ValueError(
        f"migration URI {shown(value)} must be tcp://HOST[:PORT], rdma://HOST[:PORT] or "
        "unix:///PATH (no user, query or fragment)"
    )


def check_migration_uri(value: str) -> str:
    """`value` if it is a migration URI of the strict form (parse_migration_uri)."""
    parse_migration_uri(value)
    return value


class MigrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: DomainName
    src: HostRef
    dst: HostRef
    live: bool = True
    offline: bool = False
    control: ControlFlow = ControlFlow.P2P
    transport: Transport = Transport.NATIVE
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
    postcopy: bool = False
    bandwidth_mib: int | None = Field(default=None, ge=1, le=MAX_BANDWIDTH_MIB)
    completion_timeout_s: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TIMEOUT_S)
    timeout_action: TimeoutAction | None = None  # with completion_timeout_s; suspend if unset
    parallel: int | None = Field(default=None, ge=2, le=MAX_PARALLEL_CONNECTIONS)
    copy_storage: CopyStorage | None = None
    migrate_uri: str | None = None
    listen_address: str | None = None

    @model_validator(mode="after")
    def _coherent(self) -> MigrationSpec:
        problems = combination_problems(self)
        if problems:
            raise ValueError(problems[0])
        if self.migrate_uri is not None:
            check_migration_uri(self.migrate_uri)
        if self.listen_address is not None:
            try:
                check_address(self.listen_address)
            except ValueError as exc:
                raise ValueError(f"listen address: {exc}") from None
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
        ):
            if on:
                problems.append(f"{flag} cannot go through virDomainMigrate2 (--dest-connection)")
    if tunnelled and s.migrate_uri:
        problems.append("--migrate-uri has no effect when tunnelled (no hypervisor connection)")
    if tunnelled and s.listen_address:
        problems.append("--listen-address has no effect when tunnelled")
    if tunnelled and s.postcopy:
        problems.append("--postcopy cannot be tunnelled (libvirt refuses it)")
    if tunnelled and s.parallel:
        problems.append("--parallel cannot be tunnelled (libvirt refuses it)")
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
            ("--parallel", s.parallel),
            ("--copy-storage", s.copy_storage),
            ("--bandwidth", s.bandwidth_mib),
            ("--tunnelled", tunnelled),
            ("--tls", s.tls),
            ("--migrate-uri", s.migrate_uri),
            ("--listen-address", s.listen_address),
        ):
            if on:
                problems.append(f"{flag} does not apply to an offline migration")
    if s.postcopy and not s.live:
        problems.append("--postcopy needs --live")
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
    """One line out of a pydantic ValidationError (or any exception)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = re.sub(r"^Value error, ", "", str(err.get("msg", "")))
        if "pattern" in msg and where:
            return f"invalid {where} {err.get('input')!r}"
        return f"{where}: {msg}" if where else msg
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
