"""The spec's libvirt options beyond virsh's basic flags: `--xml`, `--persistent-xml`,
`--tls-destination`, `--disks-port`, `--disks-uri`, and the requests libvirt would reject
with them (or that would silently not do what was asked).

Form only, the same answer on the producer and the worker: what the XML may change is
checked against the guest's own XML by the workers (jobs/domain_xml.py
`check_against_guest`), a disks URI's target against the registry (jobs/targets.py).
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

from config.addresses import check_address
from jobs.domain_xml import MAX_DOMAIN_XML_CHARS, form_problem
from jobs.migration_uri import parse_migration_uri

MAX_XML_CHARS = MAX_DOMAIN_XML_CHARS
# QEMU's NBD server on the destination listens where it is told; ports below 1024 belong to
# the host's privileged services, never to a migration.
MIN_DISKS_PORT = 1024
DISKS_URI_SCHEMES = ("tcp", "unix")


class OptionFields(Protocol):
    """The parts of a MigrationSpec these checks read (jobs/spec.py imports this module)."""

    @property
    def transport(self) -> Enum: ...
    @property
    def arrives_as(self) -> str: ...
    @property
    def offline(self) -> bool: ...
    @property
    def persistent(self) -> bool: ...
    @property
    def dest_connection(self) -> bool: ...
    @property
    def tls(self) -> bool: ...
    @property
    def copy_storage(self) -> Enum | None: ...
    @property
    def dest_xml(self) -> str | None: ...
    @property
    def persist_xml(self) -> str | None: ...
    @property
    def tls_destination(self) -> str | None: ...
    @property
    def disks_port(self) -> int | None: ...
    @property
    def disks_uri(self) -> str | None: ...


def option_problems(s: OptionFields) -> list[str]:
    """Why these options cannot go together with the rest of `s` (empty: they can)."""
    problems: list[str] = []
    tunnelled = s.transport.value == "tunnelled"
    if s.dest_xml is not None:
        problem = form_problem(s.dest_xml, "--xml", s.arrives_as)
        if problem:
            problems.append(problem)
        if s.offline:
            problems.append("--xml is the running guest's; an offline move takes --persistent-xml")
    if s.persist_xml is not None:
        problem = form_problem(s.persist_xml, "--persistent-xml", s.arrives_as)
        if problem:
            problems.append(problem)
        if not s.persistent:
            problems.append("--persistent-xml needs --persistent")
        if s.dest_connection:
            problems.append(
                "--persistent-xml cannot go through virDomainMigrate2 (--dest-connection)"
            )
    if s.tls_destination is not None:
        if not s.tls:
            problems.append("--tls-destination needs --tls")
        if s.dest_connection:
            problems.append(
                "--tls-destination cannot go through virDomainMigrate2 (--dest-connection)"
            )
        try:
            check_address(s.tls_destination)
        except ValueError as exc:
            problems.append(f"--tls-destination: {exc}")
    problems += _disks_problems(s, tunnelled)
    return problems


def _disks_problems(s: OptionFields, tunnelled: bool) -> list[str]:
    problems: list[str] = []
    for flag, on in (("--disks-port", s.disks_port), ("--disks-uri", s.disks_uri)):
        if on is None:
            continue
        if s.copy_storage is None:
            problems.append(f"{flag} needs --copy-storage (it is where the disks are copied)")
        if tunnelled:
            problems.append(f"{flag} has no effect when tunnelled (the disks go through libvirtd)")
    if s.disks_port is not None and s.disks_uri is not None:
        problems.append("--disks-port and --disks-uri exclude each other (a URI carries its port)")
    if s.disks_uri is not None:
        try:
            parsed = parse_migration_uri(s.disks_uri)
        except ValueError as exc:
            problems.append(f"--disks-uri: {exc}")
        else:
            if parsed.scheme not in DISKS_URI_SCHEMES:
                problems.append("--disks-uri must be tcp://HOST[:PORT] or unix:///PATH")
            elif parsed.port is not None and parsed.port < MIN_DISKS_PORT:
                problems.append(f"--disks-uri: port below {MIN_DISKS_PORT}")
    return problems
