"""Which migration policy a job runs with, and where each of its values came from.

Most specific first: the job's own flags, `--policy NAME`, the domain's libvirt metadata (a
policy name; read by the source worker from its own libvirtd), the source host's policy in
the registry, its group's policy, `default`. A layer overrides only what it sets; the
effective policy keeps, per field, the label of the layer that set it, which `drover job`
shows. The producer resolves it without the metadata layer (to refuse a bad combination
before anything is queued); the source worker resolves it again, with the metadata, from
its own registry: Redis carries only the job's request.
"""

from __future__ import annotations

from config.addresses import shown
from config.policy_model import (
    DEFAULT_POLICY,
    Compression,
    EffectivePolicy,
    MigrationPolicy,
    PolicyAction,
    PolicyLayer,
    layered,
    named_policy_layers,
    policy_problems,
)
from config.settings import ConfigError, Settings
from jobs.spec import MigrationSpec, TimeoutAction

Layer = PolicyLayer

_TIMEOUT_ACTIONS = {
    TimeoutAction.SUSPEND: PolicyAction.SUSPEND,
    TimeoutAction.POSTCOPY: PolicyAction.POSTCOPY,
    TimeoutAction.ABORT: PolicyAction.ABORT,
}


class UnknownPolicy(ConfigError):
    """A policy name no layer defines; one line."""


def named_layers(settings: Settings, name: str, label: str) -> list[Layer]:
    """The layers a policy name stands for: the shipped policy of that name, then the
    operator's `[policies.NAME]` over it."""
    layers = named_policy_layers(settings.policies, name, label)
    if not layers:
        known = ", ".join(settings.policy_names())
        raise UnknownPolicy(f"unknown policy {shown(name)} (known policies: {known})")
    return layers


def flag_layer(spec: MigrationSpec) -> MigrationPolicy:
    """The job's own flags as a policy layer: only the flags it set."""
    fields: dict[str, object] = {}
    if spec.bandwidth_mib is not None:
        fields["bandwidth_mib"] = spec.bandwidth_mib
    if spec.postcopy_bandwidth_mib is not None:
        fields["postcopy_bandwidth_mib"] = spec.postcopy_bandwidth_mib
    if spec.auto_converge:
        fields["auto_converge"] = True
    if spec.postcopy:
        fields["allow_postcopy"] = True
    if spec.compressed:
        fields["compression"] = Compression.XBZRLE
    if spec.compression is not None:  # the methods named win; the call carries them all
        fields["compression"] = spec.compression.representative
    if spec.parallel is not None:
        fields["parallel_connections"] = spec.parallel
    if spec.completion_timeout_s is not None:
        # A timer asked for by the job is what it gets: no earlier action from the figures.
        fields["completion_timeout_s"] = float(spec.completion_timeout_s)
        fields["act_on_statistics"] = False
    if spec.on_timeout is not None:
        fields["actions"] = (_TIMEOUT_ACTIONS[spec.on_timeout],)
    return MigrationPolicy.model_validate(fields)


FLAG_LABELS = {
    "bandwidth_mib": "flag --bandwidth",
    "postcopy_bandwidth_mib": "flag --postcopy-bandwidth",
    "auto_converge": "flag --auto-converge",
    "allow_postcopy": "flag --postcopy",
    "compression": "flag --compressed / --comp-methods",
    "parallel_connections": "flag --parallel",
    "completion_timeout_s": "flag --completion-timeout",
    "act_on_statistics": "flag --completion-timeout",
    "actions": "flag --timeout-action",
}


def effective_policy(
    settings: Settings,
    spec: MigrationSpec,
    metadata_policy: str | None = None,
    *,
    guest_paused: bool = False,
) -> EffectivePolicy:
    """The policy `spec` runs with on its source host; UnknownPolicy or ConfigError (one
    line) when a name is unknown or the layered policy cannot be used."""
    layers: list[Layer] = named_layers(settings, DEFAULT_POLICY, DEFAULT_POLICY)
    host = settings.hosts.get(spec.src)
    if host is not None and host.group is not None:
        group_policy = settings.groups[host.group].policy
        if group_policy is not None:
            layers += named_layers(settings, group_policy, f"group {host.group}")
    if host is not None and host.policy is not None:
        layers += named_layers(settings, host.policy, f"host {host.name}")
    if metadata_policy is not None:
        layers += named_layers(settings, metadata_policy, "domain metadata")
    if spec.policy is not None:
        layers += named_layers(settings, spec.policy, "--policy")
    chosen = layered(layers)
    flags = flag_layer(spec)
    sources = dict(chosen.sources)
    values = chosen.values.model_dump()
    for field in flags.model_fields_set:
        values[field] = getattr(flags, field)
        sources[field] = FLAG_LABELS[field]
    policy = MigrationPolicy.model_validate(values)
    effective = applicable(
        EffectivePolicy(name=chosen.name, values=policy, sources=sources), spec, guest_paused
    )
    problems = policy_problems(effective.values)
    if spec.postcopy_bandwidth_mib is not None and not effective.values.allow_postcopy:
        why = effective.sources["allow_postcopy"]
        problems.append(f"--postcopy-bandwidth needs post-copy, which is off ({why})")
    if problems:
        raise ConfigError(f"policy {effective.name}: {problems[0]}")
    return effective


def applicable(
    effective: EffectivePolicy, spec: MigrationSpec, guest_paused: bool = False
) -> EffectivePolicy:
    """The policy with what cannot apply to this migration turned off, and said so in its
    sources: post-copy for a tunnelled or offline one (libvirt refuses it), every convergence
    setting for an offline one. A flag the job set is never turned off here: such a request is
    refused by the spec's own checks."""
    values = effective.values.model_dump()
    sources = dict(effective.sources)
    why: str | None = None
    if spec.offline:
        why = "not applicable: offline migration"
    elif spec.transport.value == "tunnelled":
        why = "not applicable: tunnelled migration"
    elif not spec.live:
        why = "not applicable: non-live migration"
    elif spec.suspend:
        why = "not applicable: --suspend (libvirt refuses post-copy into a paused guest)"
    elif spec.copy_storage is not None:
        why = "not applicable by default with --copy-storage (disks must be complete first)"
    elif guest_paused:
        why = "not applicable: the guest is paused (libvirt refuses post-copy of a paused guest)"
    if why is not None and values["allow_postcopy"] and not spec.postcopy:
        values["allow_postcopy"] = False
        values["actions"] = tuple(a for a in values["actions"] if a is not PolicyAction.POSTCOPY)
        sources["allow_postcopy"] = why
    if spec.dest_connection:  # virDomainMigrate2 carries only the bandwidth and a name
        through = "not applicable: virDomainMigrate2 (--dest-connection)"
        for field, off in (
            ("parallel_connections", 1),
            ("postcopy_bandwidth_mib", 0),
        ):
            if values[field] != off:
                values[field] = off
                sources[field] = through
        if values["compression"] not in (Compression.NONE, Compression.XBZRLE):
            values["compression"] = Compression.XBZRLE
            sources["compression"] = through + ": libvirt's default method"
    if spec.offline:
        values["actions"] = ()
        values["auto_converge"] = False
        sources["actions"] = sources["auto_converge"] = "not applicable: offline migration"
    policy = MigrationPolicy.model_validate(values)
    return EffectivePolicy(name=effective.name, values=policy, sources=sources)
