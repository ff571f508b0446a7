"""A migration request checked as every producer checks it, before anything is queued.

The spec's own rules (jobs/spec.py) and then today's registry: both hosts in it, and a
--migrate-uri only toward the destination's own migration addresses or socket directory
(jobs/targets.py), and a migration policy that exists and can be used for this migration
(jobs/policy_choice.py, without the domain's metadata, which only the source worker reads).
Every refusal is a SubmitError with one line.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from config.settings import ConfigError, Settings
from jobs.errors import SubmitError
from jobs.policy_choice import effective_policy
from jobs.spec import MigrationSpec, first_error
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
    if spec.disks_uri is not None:
        problem = migration_uri_problem(spec.disks_uri, dst, "--disks-uri")
        if problem is not None:
            raise SubmitError(problem)
    try:
        effective_policy(settings, spec)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None
