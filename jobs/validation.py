"""A migration request checked as every producer checks it, before anything is queued.

The spec's own rules (jobs/spec.py) and then today's registry: both hosts in it, a
--migrate-uri only toward the destination's own migration addresses or socket directory
(jobs/targets.py), a --listen-address only at the address the source will connect to, and a
migration policy that exists and can be used for this migration
(jobs/policy_choice.py, without the domain's metadata, which only the source worker reads).
Every refusal is a SubmitError with one line.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from config.addresses import shown
from config.settings import ConfigError, Host, Settings
from jobs.errors import SubmitError
from jobs.migration_uri import parse_migration_uri
from jobs.policy_choice import effective_policy
from jobs.spec import MigrationSpec, first_error
from jobs.targets import _canonical as canonical_address
from jobs.targets import migration_uri_problem


def migration_spec(settings: Settings, request: dict[str, Any]) -> MigrationSpec:
    """Validate a request into a spec, or raise SubmitError with one line."""
    try:
        spec = MigrationSpec.model_validate(request)
    except ValidationError as exc:
        raise SubmitError(first_error(exc)) from None
    check_against_registry(settings, spec)
    return spec


def check_against_registry(settings: Settings, spec: MigrationSpec) -> None:
    """Both hosts in the registry, and a --migrate-uri only toward the destination's own
    migration addresses or socket directory (jobs/targets.py), and its policy usable;
    SubmitError otherwise."""
    try:
        settings.host(spec.src)
        dst = settings.host(spec.dst)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None
    if spec.migrate_uri is not None:
        problem = migration_uri_problem(spec.migrate_uri, dst)
        if problem is not None:
            raise SubmitError(problem)
    problem = listen_address_problem(spec, dst)
    if problem is not None:
        raise SubmitError(problem)
    if spec.disks_uri is not None:
        problem = migration_uri_problem(spec.disks_uri, dst, "--disks-uri")
        if problem is not None:
            raise SubmitError(problem)
    try:
        effective_policy(settings, spec)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None


def listen_address_problem(spec: MigrationSpec, dst: Host) -> str | None:
    """Why the destination's QEMU cannot be told to listen at `spec.listen_address`, or None.

    The source's QEMU connects to the migration URI's host (`--migrate-uri`, already checked to
    be one of `dst`'s migration addresses, else its `migration_address`): the destination's
    can only usefully listen there. Any other address fails in perform, inside QEMU (not one
    of the host's: "Cannot assign requested address"; another of its addresses: nobody
    connects), and any other name is resolved by the destination, to anything. A wildcard
    (0.0.0.0, ::) is refused too: what --listen-address is for is narrowing where QEMU
    listens, and without it QEMU listens where the host's libvirt (qemu.conf) says.
    """
    if spec.listen_address is None:
        return None
    listen = spec.listen_address
    dialed: str | None
    if spec.migrate_uri is None:
        dialed, where = dst.migration_address, "its migration_address in the registry"
    else:
        dialed, where = parse_migration_uri(spec.migrate_uri).host, "--migrate-uri's host"
    if dialed is None:
        return (
            f"--listen-address {shown(listen)}: a unix:// --migrate-uri has no address to listen at"
        )
    if canonical_address(listen) == canonical_address(dialed):
        return None
    return (
        f"--listen-address {shown(listen)}: the source connects to {dst.name} at {dialed} "
        f"({where}), so its QEMU can only listen there (leave the option out for libvirt's own)"
    )
