"""The settings' model: the registry of hosts, the cluster limits, tunables and security.

Loaded from drover.toml by config/settings.py, which re-exports every name here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from config.addresses import MAX_PORT, check_address, parse_ip, shown
from config.metrics import DEFAULT_METRICS_ADDRESS, DEFAULT_METRICS_PORT
from config.policy_model import (
    BUILTIN_POLICIES,
    DEFAULT_POLICY,
    MigrationPolicy,
    PolicyName,
    standing_problems,
)
from config.tunables import MAX_PHASE_DELAY_S, phase_name_problem
from config.tunables import Tunables as Tunables
from config.uris import ALLOWED_PARAMS, ALLOWED_SCHEMES, check_libvirt_uri

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# Top-level keys that replace the default URI allowlists (config/uris.py).
URI_SCHEMES_KEY = "allowed_uri_schemes"
URI_PARAMS_KEY = "allowed_uri_params"

HostName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", strip_whitespace=False)
]


PhaseDelay = Annotated[float, Field(ge=0, le=MAX_PHASE_DELAY_S, allow_inf_nan=False)]


class ConfigError(Exception):
    """A configuration problem an operator can fix; its message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostLimits(_Strict):
    """What drover may use on a host, declared by the operator (like Nova's allocation ratios).

    `memory_mib` caps the guest memory drover will place on the host; without it only the free
    memory libvirt reports counts.
    """

    memory_mib: int | None = Field(default=None, ge=1)
    max_outbound: int = Field(default=2, ge=1, le=64)
    max_inbound: int = Field(default=2, ge=1, le=64)


class Host(_Strict):
    """One hypervisor host in the registry. Producers name it; only workers use its URIs."""

    name: HostName
    libvirt_uri: str = "qemu:///system"
    peer_uri: str
    migration_address: str
    # Other addresses of this host a `--migrate-uri tcp://ADDR` may name (a second NIC); the
    # migration stream goes to `migration_address` or one of these, never anywhere else.
    migration_addresses: list[str] = []
    # `--migrate-uri unix:///PATH` is allowed only for a path under this directory (unset: no
    # unix:// migration URI toward this host at all).
    migration_socket_dir: str | None = None
    # Where this host's worker may create (and after a failure remove) disk images for
    # `--copy-storage`: a guest whose disks live elsewhere cannot be copied here.
    storage_dirs: list[str] = ["/var/lib/libvirt/images"]
    # The worker's own records on this host (images it created, message nonces it has seen):
    # never in Redis, which the worker does not trust for what it does to its host.
    state_dir: str = "/var/lib/drover"
    limits: HostLimits = HostLimits()
    # The migration policy of guests leaving this host (config/policy_model.py), and the
    # host group whose policy applies when the host names none.
    policy: PolicyName | None = None
    group: PolicyName | None = None
    # The worker's Prometheus exporter (docs/metrics.md): loopback by default, port 0 for none.
    # Its series name the host's domains: listening on every interface needs expose_all.
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT, ge=0, le=MAX_PORT)
    metrics_expose_all: bool = False

    @field_validator("libvirt_uri", "peer_uri")
    @classmethod
    def _allowed_uri(cls, value: str, info: ValidationInfo) -> str:
        """An allowed transport and allowed parameters only (config/uris.py)."""
        context = info.context or {}
        schemes = context.get(URI_SCHEMES_KEY, ALLOWED_SCHEMES)
        params = context.get(URI_PARAMS_KEY, ALLOWED_PARAMS)
        return check_libvirt_uri(value, schemes, params)

    @field_validator("migration_address", "metrics_address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value)

    @model_validator(mode="after")
    def _metrics_not_everywhere(self) -> Host:
        """A wildcard would publish the host's domain names on every interface: only when
        the registry says so in as many words."""
        if is_wildcard(self.metrics_address) and not self.metrics_expose_all:
            raise ValueError(
                f"metrics_address {self.metrics_address} listens on every interface; "
                "name one address, or set metrics_expose_all = true"
            )
        return self

    @field_validator("migration_addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return [check_address(v) for v in value]

    @field_validator("migration_socket_dir", "state_dir")
    @classmethod
    def _absolute_dir(cls, value: str | None) -> str | None:
        if value is not None:
            _check_absolute(value)
        return value

    @field_validator("storage_dirs")
    @classmethod
    def _absolute_dirs(cls, value: list[str]) -> list[str]:
        for v in value:
            _check_absolute(v)
        return value


def is_wildcard(address: str) -> bool:
    """Whether binding `address` listens on every interface (0.0.0.0, ::)."""
    ip = parse_ip(address.removeprefix("[").removesuffix("]"))
    return ip is not None and ip.is_unspecified


def _check_absolute(path: str) -> None:
    """A plain absolute directory: no `..`, no characters a shell or URI would read."""
    if not re.match(r"^/[A-Za-z0-9._/-]{0,255}\Z", path) or ".." in path.split("/"):
        raise ValueError(f"{path!r} is not a plain absolute path")


class HostGroup(_Strict):
    """Hosts that share settings; today their migration policy."""

    policy: PolicyName | None = None


class Cluster(_Strict):
    """Fleet-wide limits: migrations in flight at once, whoever submitted them; and, if set,
    how many jobs one producer may have waiting for admission (jobs/quota.py; an evacuation's
    children are not counted)."""

    max_migrations: int = Field(default=8, ge=1, le=1024)
    max_waiting_per_producer: int | None = Field(default=None, ge=1, le=1_000_000)


class FaultInjection(_Strict):
    """For the fault-injection suite only: hold a phase open so a fault can land inside it.

    `phase_delays` maps a phase name (config/tunables.py PHASE_NAMES) to seconds slept at its
    start: 0 up to an hour. Empty in production.
    """

    phase_delays: dict[str, PhaseDelay] = {}

    @field_validator("phase_delays")
    @classmethod
    def _phases(cls, value: dict[str, float]) -> dict[str, float]:
        for name in value:
            problem = phase_name_problem(name)
            if problem is not None:
                raise ValueError(problem)
        return value


class Security(_Strict):
    """Signed task messages: Celery's `auth` serializer (docs/security.md).

    With `signing` on, producers and workers sign every task message with `key` (RSA, PEM)
    and `certificate`, and accept only messages signed by a certificate in `cert_store` (a
    directory holding nothing but trusted certificates).
    """

    signing: bool = False
    # Run without signed requests and messages (anyone with the Redis password then controls
    # every worker). A worker refuses to start unsigned unless this says so, and then warns.
    insecure: bool = False
    key: str | None = None
    certificate: str | None = None
    cert_store: str | None = None
    digest: Literal["sha256", "sha384", "sha512"] = "sha256"

    @model_validator(mode="after")
    def _complete(self) -> Security:
        if not self.signing:
            return self
        for name in ("key", "certificate", "cert_store"):
            value = getattr(self, name)
            if not value:
                raise ValueError(f"signing = true needs {name}")
            if not Path(value).exists():
                raise ValueError(f"{name} {value} does not exist")
        return self


class Settings(_Strict):
    redis_url: str = DEFAULT_REDIS_URL
    hosts: dict[str, Host] = {}
    cluster: Cluster = Cluster()
    tunables: Tunables = Tunables()
    security: Security = Security()
    faults: FaultInjection = FaultInjection()
    # `[policies.NAME]`, partial tables over the shipped ones (config/policy_model.py).
    policies: dict[PolicyName, MigrationPolicy] = {}
    groups: dict[PolicyName, HostGroup] = {}
    # The URI allowlists the registry was checked with (config/uris.py); workers check every
    # URI against them again where they open it.
    allowed_uri_schemes: frozenset[str] = ALLOWED_SCHEMES
    allowed_uri_params: frozenset[str] = ALLOWED_PARAMS
    source: str = "<defaults>"

    @model_validator(mode="after")
    def _policies_known(self) -> Settings:
        known = self.policy_names()
        for host in self.hosts.values():
            if host.policy is not None and host.policy not in known:
                raise ValueError(f"host {host.name}: unknown policy {host.policy!r}")
            if host.group is not None and host.group not in self.groups:
                raise ValueError(f"host {host.name}: unknown group {host.group!r}")
        for name, group in self.groups.items():
            if group.policy is not None and group.policy not in known:
                raise ValueError(f"group {name}: unknown policy {group.policy!r}")
        self._policies_usable()
        return self

    def _policies_usable(self) -> None:
        """The policy every job gets before its own flags, fleet-wide (`default`) and on each
        host (its group's and its own over it), must be usable: otherwise it loaded and then
        every migration using it was refused. A policy named only by `--policy` is checked
        when a job names it (its flags may complete it); `drover policies` shows its problems."""
        problems = standing_problems(self.policies, [])
        if problems:
            raise ValueError(f"policy {DEFAULT_POLICY}: {problems[0]}")
        for host in self.hosts.values():
            chain: list[tuple[str, str]] = []
            group = self.groups[host.group].policy if host.group is not None else None
            if group is not None:
                chain.append((group, f"group {host.group}"))
            if host.policy is not None:
                chain.append((host.policy, f"host {host.name}"))
            problems = standing_problems(self.policies, chain) if chain else []
            if problems:
                raise ValueError(f"host {host.name}: policy {chain[-1][0]}: {problems[0]}")

    def policy_names(self) -> list[str]:
        """Every policy a job may name: the shipped ones and the configured ones."""
        return sorted(set(BUILTIN_POLICIES) | set(self.policies))

    def host(self, name: str) -> Host:
        """The registry entry for `name`, or a one-line error listing the known hosts."""
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise ConfigError(f"unknown host {shown(name)} (known hosts: {known})") from None
