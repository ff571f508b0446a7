"""Migration policies: how a live migration is run and what is done when it will not converge.

A policy is a `[policies.NAME]` table in drover.toml; every field is optional there, and
what a table leaves out comes from the layer below it. The layers, most specific first (see
jobs/policy_choice.py): the job's own flags, `--policy NAME`, the domain's libvirt metadata,
its host's policy, its host group's policy, `default`. `default` is shipped (below) and an
operator's `[policies.default]` adjusts it.

Why these fields: they are the union of what Nova (live_migration_downtime/_steps,
completion_timeout, timeout_action, permit_post_copy), KubeVirt's MigrationPolicy
(bandwidthPerMigration, completionTimeoutPerGiB, progressTimeout, allowAutoConverge,
allowPostCopy) and oVirt's convergence schedules offer (docs/convergence.md maps each one).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

POLICY_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
PolicyName = Annotated[str, StringConstraints(pattern=POLICY_NAME_PATTERN)]
DEFAULT_POLICY = "default"

MAX_BANDWIDTH_MIB = 1_000_000
MAX_DOWNTIME_MS = 60_000
MAX_DOWNTIME_STEPS = 20
MAX_PARALLEL_CONNECTIONS = 64
MAX_TIMEOUT_S = 86_400
MAX_THROTTLE_PERCENT = 99  # QEMU's cpu-throttle-max default: the guest keeps 1% of its CPU


class PolicyAction(StrEnum):
    """What the monitor may do, in the policy's order, to a pre-copy that will not converge."""

    RAISE_DOWNTIME = "raise_downtime"  # allow a longer final pause (migrateSetMaxDowntime)
    THROTTLE = "throttle"  # let auto-converge slow the guest's vCPUs (needs auto_converge)
    POSTCOPY = "postcopy"  # run the guest on the destination now (migrateStartPostCopy)
    SUSPEND = "suspend"  # pause the guest until the rest is copied (suspend)
    ABORT = "abort"  # give up; the guest stays where it was (abortJob)


class Compression(StrEnum):
    """libvirt's VIR_MIGRATE_PARAM_COMPRESSION methods; zlib and zstd need parallel links."""

    NONE = "none"
    XBZRLE = "xbzrle"
    MT = "mt"
    ZLIB = "zlib"
    ZSTD = "zstd"


class MigrationPolicy(BaseModel):
    """One policy's values. Defaults are the shipped `default` policy; a layer overrides only
    the fields it sets (`model_fields_set`), which is how provenance is told."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # finite

    # Pre-copy bandwidth in MiB/s; 0: no cap (libvirt's own convention).
    bandwidth_mib: int = Field(default=0, ge=0, le=MAX_BANDWIDTH_MIB)
    # Post-copy bandwidth in MiB/s (VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY); 0: no cap.
    postcopy_bandwidth_mib: int = Field(default=0, ge=0, le=MAX_BANDWIDTH_MIB)
    # The longest final pause the policy allows, reached in `downtime_steps` equal steps
    # (max/steps first, max last), one step per `raise_downtime` action. The default starts
    # at QEMU's own 300 ms: a lower start would also make every pass end later (a pass ends
    # when what is left could be sent within the allowed downtime).
    max_downtime_ms: int = Field(default=300, ge=1, le=MAX_DOWNTIME_MS)
    downtime_steps: int = Field(default=1, ge=1, le=MAX_DOWNTIME_STEPS)
    auto_converge: bool = False
    auto_converge_initial: int = Field(default=20, ge=1, le=MAX_THROTTLE_PERCENT)
    auto_converge_increment: int = Field(default=10, ge=1, le=MAX_THROTTLE_PERCENT)
    allow_postcopy: bool = True
    # No new low of data_remaining for this long: the migration stalls, take the next action.
    progress_timeout_s: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT_S)
    # Time to converge per GiB of guest memory (at least one GiB counts); then the next action.
    completion_timeout_per_gib_s: float = Field(default=150.0, gt=0, le=MAX_TIMEOUT_S)
    # A fixed completion timeout (a job's --completion-timeout); overrides the per-GiB one.
    completion_timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S)
    # Act as soon as libvirt's statistics show pre-copy will not converge, or stalls; false:
    # only at the completion timeout (virsh's --timeout; a job's --completion-timeout).
    act_on_statistics: bool = True
    compression: Compression = Compression.NONE
    parallel_connections: int = Field(default=1, ge=1, le=MAX_PARALLEL_CONNECTIONS)
    actions: tuple[PolicyAction, ...] = (
        PolicyAction.RAISE_DOWNTIME,
        PolicyAction.POSTCOPY,
        PolicyAction.SUSPEND,
        PolicyAction.ABORT,
    )

    @model_validator(mode="after")
    def _coherent(self) -> MigrationPolicy:
        if len(set(self.actions)) != len(self.actions):
            raise ValueError("actions: each action may appear once")
        return self

    def downtime_schedule_ms(self) -> list[int]:
        """The allowed downtime after each step: max/steps first, the max last."""
        n = self.downtime_steps
        return [round(self.max_downtime_ms * i / n) for i in range(1, n + 1)]

    def completion_timeout_for(self, memory_mib: int) -> float:
        """The completion timeout of a guest of `memory_mib` (a fixed one wins)."""
        if self.completion_timeout_s is not None:
            return self.completion_timeout_s
        gib = max(1.0, memory_mib / 1024)
        return self.completion_timeout_per_gib_s * gib


def policy_problems(p: MigrationPolicy) -> list[str]:
    """What makes an effective (fully layered) policy unusable; each one line."""
    problems = []
    if PolicyAction.THROTTLE in p.actions and not p.auto_converge:
        problems.append("the throttle action needs auto_converge = true")
    if PolicyAction.POSTCOPY in p.actions and not p.allow_postcopy:
        problems.append("the postcopy action needs allow_postcopy = true")
    if p.compression in (Compression.ZLIB, Compression.ZSTD) and p.parallel_connections < 2:
        problems.append(f"compression {p.compression.value} needs parallel_connections >= 2")
    return problems


# Shipped besides `default`: a policy that never lets the guest run on the destination before
# it is complete there (post-copy forbidden), and one that takes no action at all (plain
# pre-copy, virsh's behaviour; only the fleet's migration_timeout ends it).
BUILTIN_POLICIES: dict[str, MigrationPolicy] = {
    DEFAULT_POLICY: MigrationPolicy(),
    "no-postcopy": MigrationPolicy(
        allow_postcopy=False,
        auto_converge=True,
        auto_converge_initial=50,
        auto_converge_increment=15,
        max_downtime_ms=500,
        downtime_steps=5,
        progress_timeout_s=10.0,
        actions=(
            PolicyAction.RAISE_DOWNTIME,
            PolicyAction.THROTTLE,
            PolicyAction.SUSPEND,
            PolicyAction.ABORT,
        ),
    ),
    "manual": MigrationPolicy(allow_postcopy=False, actions=()),
}


# A layer of a job's policy: its label (where its values come from), its values, and the
# policy's name (None for a layer that is no named policy: the job's flags).
PolicyLayer = tuple[str, MigrationPolicy, str | None]


def named_policy_layers(
    configured: Mapping[str, MigrationPolicy], name: str, label: str
) -> list[PolicyLayer]:
    """The layers a policy name stands for: the shipped policy of that name, then the
    operator's `[policies.NAME]` (`configured`) over it; none for a name neither defines."""
    layers: list[PolicyLayer] = []
    said = label if label == name else f"{label}: policy {name}"
    if name in BUILTIN_POLICIES:
        layers.append((f"{said} (shipped)", BUILTIN_POLICIES[name], name))
    if name in configured:
        layers.append((f"{said} (drover.toml)", configured[name], name))
    return layers


def standing_problems(
    configured: Mapping[str, MigrationPolicy], chain: list[tuple[str, str]]
) -> list[str]:
    """What makes unusable the policy every job gets from `chain` ((name, label) of each
    named policy over `default`, least specific first: a host's group's, the host's) before
    any flag or `--policy` of its own: the rule (policy_problems) a job's policy is checked
    with (jobs/policy_choice.py), applied when the config loads. Names must be known."""
    layers = named_policy_layers(configured, DEFAULT_POLICY, DEFAULT_POLICY)
    for name, label in chain:
        layers += named_policy_layers(configured, name, label)
    return policy_problems(layered(layers).values)


class EffectivePolicy(BaseModel):
    """The policy a job runs with, and where each value came from (e.g. `flag --bandwidth`,
    `policy fast`, `domain metadata (policy db)`, `host lab1 (policy db)`, `default`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # the most specific named policy that applied
    values: MigrationPolicy
    sources: dict[str, str]


def layered(layers: list[PolicyLayer]) -> EffectivePolicy:
    """Stack `layers` (label, policy, policy name or None), least specific first, into one
    policy; each field keeps the value and label of the last layer that set it. The first
    layer is the base: every one of its fields counts as set."""
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    name = DEFAULT_POLICY
    for i, (label, policy, policy_name) in enumerate(layers):
        fields = MigrationPolicy.model_fields if i == 0 else policy.model_fields_set
        for field in fields:
            values[field] = getattr(policy, field)
            sources[field] = label
        if policy_name is not None:
            name = policy_name
    return EffectivePolicy(
        name=name, values=MigrationPolicy.model_validate(values), sources=sources
    )
