"""Migration policies: which one a job runs with, where each value came from, and refusals.

The layering (jobs/policy_choice.py) most specific first: the job's own flags, `--policy`,
the domain's metadata, its host's policy, its group's policy, `default`. Unknown names are one
line at every level; `applicable()` turns off what cannot apply to a migration and says why.
"""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from config.policy_model import BUILTIN_POLICIES, Compression, MigrationPolicy, PolicyAction
from config.settings import ConfigError, Settings, load_settings
from jobs.evacuation import EvacuationState, EvacuationStore
from jobs.evacuation_model import EvacuationSpec, Placement
from jobs.policy_choice import UnknownPolicy, effective_policy
from jobs.spec import MigrationSpec
from jobs.store import JobStore
from producer.cli_policies import standing
from tests.support.registry import REGISTRY
from tests.unit import test_libvirt_seam as seam
from worker.domain_metadata import PLACEMENT_NS, anti_affinity_group, policy_name
from worker.evacuation import plan_and_queue_or_fail
from worker.evacuation_plan import checked, child_spec
from worker.fleet_view import gather
from worker.libvirt_host import dirty_rates_mib_s
from worker.placement import Estimate, Guest

LAYERED = """
[policies.fast]
bandwidth_mib = 500
max_downtime_ms = 100

[policies.db]
max_downtime_ms = 50
allow_postcopy = false
actions = ["raise_downtime", "suspend"]

[policies.rack]
parallel_connections = 4
progress_timeout_s = 12

[policies.hostpol]
progress_timeout_s = 20
downtime_steps = 2

[policies.default]
max_downtime_ms = 400

[groups.racks]
policy = "rack"
"""


def settings_with(tmp_path: Path, extra: str, host_lines: str = "") -> Settings:
    text = REGISTRY.format(url="redis://127.0.0.1:6379/0")
    text = text.replace(
        'migration_address = "192.0.2.1"\n', f'migration_address = "192.0.2.1"\n{host_lines}'
    )
    path = tmp_path / "drover.toml"
    path.write_text(text + extra)
    return load_settings(path)


@pytest.fixture
def fleet(tmp_path: Path) -> Settings:
    return settings_with(tmp_path, LAYERED, 'policy = "hostpol"\ngroup = "racks"\n')


def spec(**kw: object) -> MigrationSpec:
    return MigrationSpec.model_validate({"domain": "web01", "src": "kvm1", "dst": "kvm2", **kw})


def test_each_layer_overrides_only_what_it_sets_and_says_so(fleet: Settings) -> None:
    chosen = effective_policy(fleet, spec(policy="fast", bandwidth_mib=7), "db")
    assert chosen.name == "fast"
    v, src = chosen.values, chosen.sources
    assert (v.bandwidth_mib, src["bandwidth_mib"]) == (7, "flag --bandwidth")
    assert (v.max_downtime_ms, src["max_downtime_ms"]) == (
        100,
        "--policy: policy fast (drover.toml)",
    )
    assert (v.allow_postcopy, src["allow_postcopy"]) == (
        False,
        "domain metadata: policy db (drover.toml)",
    )
    assert src["actions"] == "domain metadata: policy db (drover.toml)"
    assert (v.progress_timeout_s, src["progress_timeout_s"]) == (
        20,
        "host kvm1: policy hostpol (drover.toml)",
    )
    assert (v.downtime_steps, src["downtime_steps"]) == (
        2,
        "host kvm1: policy hostpol (drover.toml)",
    )
    assert (v.parallel_connections, src["parallel_connections"]) == (
        4,
        "group racks: policy rack (drover.toml)",
    )
    assert src["compression"] == "default (shipped)"


@pytest.mark.parametrize(
    ("request_kw", "metadata", "name", "downtime", "source"),
    [
        ({"policy": "fast"}, "db", "fast", 100, "--policy: policy fast (drover.toml)"),
        ({}, "db", "db", 50, "domain metadata: policy db (drover.toml)"),
        ({}, None, "hostpol", 400, "default (drover.toml)"),
    ],
)
def test_precedence_of_the_named_layers(
    fleet: Settings,
    request_kw: dict[str, object],
    metadata: str | None,
    name: str,
    downtime: int,
    source: str,
) -> None:
    chosen = effective_policy(fleet, spec(**request_kw), metadata)
    assert chosen.name == name
    assert (chosen.values.max_downtime_ms, chosen.sources["max_downtime_ms"]) == (downtime, source)


def test_group_then_default_when_the_host_names_no_policy(tmp_path: Path) -> None:
    grouped = settings_with(tmp_path, LAYERED, 'group = "racks"\n')
    chosen = effective_policy(grouped, spec())
    assert chosen.name == "rack"
    assert chosen.sources["progress_timeout_s"] == "group racks: policy rack (drover.toml)"
    plain = effective_policy(settings_with(tmp_path, ""), spec())
    assert plain.name == "default" and plain.values == BUILTIN_POLICIES["default"]
    assert set(plain.sources.values()) == {"default (shipped)"}


def test_a_shipped_policy_and_a_drover_toml_table_over_it(tmp_path: Path) -> None:
    fleet = settings_with(tmp_path, "[policies.no-postcopy]\nmax_downtime_ms = 900\n")
    chosen = effective_policy(fleet, spec(policy="no-postcopy"))
    assert chosen.sources["max_downtime_ms"] == "--policy: policy no-postcopy (drover.toml)"
    assert chosen.sources["allow_postcopy"] == "--policy: policy no-postcopy (shipped)"
    assert not chosen.values.allow_postcopy


def test_unknown_names_at_the_job_and_metadata_levels_are_one_line(fleet: Settings) -> None:
    with pytest.raises(
        UnknownPolicy, match=r"^unknown policy 'nope' \(known policies: db, default, fast"
    ):
        effective_policy(fleet, spec(policy="nope"))
    with pytest.raises(UnknownPolicy, match="unknown policy 'typo'"):
        effective_policy(fleet, spec(), "typo")


@pytest.mark.parametrize(
    ("extra", "host_lines", "message"),
    [
        ("", 'policy = "nope"\n', "host kvm1: unknown policy 'nope'"),
        ("", 'group = "nope"\n', "host kvm1: unknown group 'nope'"),
        ('[groups.g]\npolicy = "nope"\n', "", "group g: unknown policy 'nope'"),
        ("", 'policy = "Not A Name"\n', "hosts.kvm1.policy"),
        ("[policies.x]\nbandwidth_mb = 5\n", "", "policies.x.bandwidth_mb"),
        ('[policies.x]\nactions = ["postcopy", "postcopy"]\n', "", "each action may appear once"),
        (
            "[policies.x]\nprogress_timeout_s = nan\n",
            "",
            "x.progress_timeout_s: Input should be a finite",
        ),
    ],
)
def test_unknown_names_in_the_registry_are_one_line_config_errors(
    tmp_path: Path, extra: str, host_lines: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_with(tmp_path, extra, host_lines)
    assert message in str(caught.value) and "\n" not in str(caught.value)


ZIP = '[policies.zip]\ncompression = "zstd"\n'


@pytest.mark.parametrize(
    ("extra", "host_lines", "message"),
    [
        (
            '[policies.default]\ncompression = "zlib"\n',
            "",
            "policy default: compression zlib needs parallel_connections >= 2",
        ),
        (
            '[policies.default]\nallow_postcopy = false\nactions = ["postcopy"]\n',
            "",
            "policy default: the postcopy action needs allow_postcopy = true",
        ),
        (
            '[policies.default]\nactions = ["throttle"]\n',
            "",
            "policy default: the throttle action needs auto_converge = true",
        ),
        (ZIP, 'policy = "zip"\n', "host kvm1: policy zip: compression zstd needs"),
        (ZIP + '[groups.g]\npolicy = "zip"\n', 'group = "g"\n', "host kvm1: policy zip:"),
    ],
)
def test_a_policy_every_job_of_a_host_would_be_refused_with_does_not_load(
    tmp_path: Path, extra: str, host_lines: str, message: str
) -> None:
    """It loaded, `drover policies` showed it, and every migration using it was refused."""
    with pytest.raises(ConfigError) as caught:
        settings_with(tmp_path, extra, host_lines)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    # The rule is the one a job is checked with: with the config taken as it is, refused too.
    names = [n for n in ("zip", "default") if f"[policies.{n}]" in extra]
    fleet = Settings.model_construct(
        policies={n: settings_with_policy(tmp_path, extra, n) for n in names},
        hosts={},
        groups={},
    )
    with pytest.raises(ConfigError, match=message.split(": ", 1)[-1].replace("(", r"\(")):
        effective_policy(fleet, spec(policy=names[0]))


def settings_with_policy(tmp_path: Path, extra: str, name: str) -> MigrationPolicy:
    """`[policies.NAME]` of `extra` alone, as its own model (the config would not load)."""
    import tomllib

    return MigrationPolicy.model_validate(tomllib.loads(extra)["policies"][name])


def test_a_policy_completed_by_its_host_group_or_left_to_jobs_loads(tmp_path: Path) -> None:
    """Usable where it applies (its group sets the parallel connections), or named only by
    `--policy` (a job's flags may complete it: refused then, with its reason)."""
    wide = '[policies.wide]\nparallel_connections = 4\n[groups.g]\npolicy = "wide"\n'
    fleet = settings_with(tmp_path, ZIP + wide, 'group = "g"\npolicy = "zip"\n')
    assert effective_policy(fleet, spec()).values.compression is Compression.ZSTD
    alone = settings_with(tmp_path, ZIP)
    assert effective_policy(alone, spec(policy="zip", parallel=2)).values.parallel_connections == 2


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"transport": "tunnelled"}, "not applicable: tunnelled migration"),
        ({"live": False, "offline": True, "persistent": True}, "not applicable: offline migration"),
        ({"suspend": True}, "not applicable: --suspend"),
        ({"copy_storage": "all"}, "not applicable by default with --copy-storage"),
    ],
)
def test_applicable_turns_post_copy_off_where_it_cannot_run(
    kw: dict[str, object], why: str
) -> None:
    chosen = effective_policy(Settings(), spec(**kw))
    assert not chosen.values.allow_postcopy
    assert PolicyAction.POSTCOPY not in chosen.values.actions
    assert chosen.sources["allow_postcopy"].startswith(why)


def test_applicable_offline_takes_every_action_away() -> None:
    chosen = effective_policy(Settings(), spec(live=False, offline=True, persistent=True))
    assert chosen.values.actions == () and not chosen.values.auto_converge
    assert chosen.sources["actions"] == "not applicable: offline migration"


def test_applicable_keeps_a_postcopy_flag_with_copy_storage() -> None:
    chosen = effective_policy(Settings(), spec(copy_storage="all", postcopy=True))
    assert chosen.values.allow_postcopy and chosen.sources["allow_postcopy"] == "flag --postcopy"


def test_applicable_dest_connection_drops_what_virdomainmigrate2_cannot_carry(
    tmp_path: Path,
) -> None:
    fleet = settings_with(
        tmp_path,
        '[policies.wide]\nparallel_connections = 4\ncompression = "zstd"\n'
        "postcopy_bandwidth_mib = 9\n",
    )
    chosen = effective_policy(fleet, spec(policy="wide", dest_connection=True))
    v, src = chosen.values, chosen.sources
    assert (v.parallel_connections, v.postcopy_bandwidth_mib) == (1, 0)
    assert v.compression is Compression.XBZRLE
    assert src["parallel_connections"] == "not applicable: virDomainMigrate2 (--dest-connection)"


@pytest.mark.parametrize(
    ("kw", "extra", "message"),
    [
        (
            {"policy": "zip"},
            '[policies.zip]\ncompression = "zstd"\n',
            "compression zstd needs parallel_connections >= 2",
        ),
        (
            {"policy": "thr"},
            '[policies.thr]\nactions = ["throttle"]\n',
            "the throttle action needs auto_converge",
        ),
        (
            {"policy": "no-postcopy", "postcopy_bandwidth_mib": 5},
            "",
            "--postcopy-bandwidth needs post-copy",
        ),
        (
            {"suspend": True, "postcopy_bandwidth_mib": 5},
            "",
            "--postcopy-bandwidth needs post-copy, which is off (not applicable: --suspend",
        ),
    ],
)
def test_unusable_combinations_are_refused(
    tmp_path: Path, kw: dict[str, object], extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match="^policy .*" + message.replace("(", r"\(")):
        effective_policy(settings_with(tmp_path, extra), spec(**kw))


def test_drover_policies_shows_own_values_and_inherited_ones(fleet: Settings) -> None:
    fast = standing(fleet, "fast")
    assert fast.sources["bandwidth_mib"] == "drover.toml"
    assert fast.sources["max_downtime_ms"] == "drover.toml"
    assert fast.sources["actions"] == "default (shipped)"
    assert standing(fleet, "default").sources["max_downtime_ms"] == "drover.toml"
    assert standing(fleet, "manual").sources["actions"] == "shipped"


# --- evacuations: the children's policy, and the dry run's estimate -------------------------


def placement(**kw: object) -> Placement:
    base = {"domain": "web01", "uuid": "u1", "memory_mib": 1000, "active": True, "persistent": True}
    return Placement.model_validate(base | {"destination": "kvm2"} | kw)


def test_every_child_carries_the_evacuations_policy(fleet: Settings) -> None:
    ev_spec = EvacuationSpec(host="kvm1", policy="fast")
    child = ev_spec.child("web01", "kvm2", active=True, persistent=True)
    assert child.policy == "fast"
    offline = ev_spec.child("web01", "kvm2", active=False, persistent=True)
    assert offline.policy is None and offline.offline


def test_the_dry_run_counts_the_policy_cap_and_names_the_convergence_action(
    fleet: Settings,
) -> None:
    class Ev:
        spec = EvacuationSpec(host="kvm1", policy="db")

    estimate = Estimate(startup_s=2.0, mib_per_s=100.0)
    busy = Guest("web01", "u1", 1000, True, True, dirty_mib_s=150.0)
    p = checked(fleet, Ev(), placement(), busy, estimate)  # type: ignore[arg-type]
    assert p.policy == "db" and p.estimate_s == 12.0  # no cap: 1000 MiB at 100 MiB/s
    assert (
        p.convergence
        == "will not converge without suspend (dirties 150 MiB/s, copied at 100 MiB/s)"
    )
    Ev.spec = EvacuationSpec(host="kvm1", bandwidth_mib=50)
    p = checked(fleet, Ev(), placement(), busy, estimate)  # type: ignore[arg-type]
    assert p.estimate_s == 22.0  # the flag's cap, below the fleet's rate
    assert p.convergence is not None and p.convergence.startswith("post-copy likely")
    quiet = Guest("web01", "u1", 1000, True, True, dirty_mib_s=5.0)
    assert checked(fleet, Ev(), placement(), quiet, estimate).convergence.startswith(  # type: ignore[arg-type, union-attr]
        "pre-copy converges"
    )
    unknown = Guest("web01", "u1", 1000, True, True, policy="typo")
    refused = checked(fleet, Ev(), placement(), unknown, estimate)  # type: ignore[arg-type]
    assert refused.destination is None
    assert (
        refused.reason is not None and "migration policy: unknown policy 'typo'" in refused.reason
    )


def test_the_estimate_takes_the_lower_of_the_cap_and_the_fleets_rate() -> None:
    estimate = Estimate(startup_s=1.0, mib_per_s=100.0)
    guest = Guest("g", "u", 400, True, True)
    assert estimate.seconds(guest) == 5.0
    assert estimate.seconds(guest, cap_mib=40) == 11.0
    assert estimate.seconds(guest, cap_mib=1000) == 5.0
    manual = BUILTIN_POLICIES["manual"]
    dirty = Guest("g", "u", 400, True, True, dirty_mib_s=500.0)
    assert estimate.convergence(guest, "manual", manual) is None  # no dirty rate measured
    said = estimate.convergence(dirty, "manual", manual)
    assert said is not None and said.startswith("will not converge: policy manual takes no action")
    nopc = BUILTIN_POLICIES["no-postcopy"]
    said = estimate.convergence(dirty, "no-postcopy", nopc)
    assert said is not None and said.startswith(
        "throttling (auto-converge), then will not converge without suspend"
    )


def test_child_spec_is_the_evacuations_child(fleet: Settings) -> None:
    class Ev:
        spec = EvacuationSpec(host="kvm1", policy="fast", tunnelled=True)

    child = child_spec(Ev(), placement())  # type: ignore[arg-type]
    assert child.policy == "fast" and child.transport.value == "tunnelled"


# --- the worker's side, against libvirt's test driver --------------------------------------

env = seam.env  # the seam tests' fixtures: a registry file, the test hypervisor
hv = seam.hv
GUEST = seam.GUEST


def test_the_planner_reads_the_metadata_policy_and_no_dirty_rate_unmeasured(
    env: Path,
    store: JobStore,
    hv: libvirt.virConnect,
    tmp_path: Path,
) -> None:
    dom = hv.lookupByName(GUEST)
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        '<placement policy="db"/>',
        "drover",
        PLACEMENT_NS,
        live,
    )
    try:
        view = gather(seam.runtime(store, "kvm1", tmp_path), EvacuationSpec(host="kvm1"), "0" * 12)
    finally:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, PLACEMENT_NS, live)
    (guest,) = view.guests
    assert guest.policy == "db" and guest.dirty_mib_s is None
    assert dirty_rates_mib_s(hv) == {}  # no calculation ran (the test driver has none)


def test_a_guest_without_metadata_has_none_and_an_unreadable_one_is_an_error(
    hv: libvirt.virConnect,
) -> None:
    """Only libvirt's "no such metadata" reads as undeclared: a guest whose metadata cannot be
    read (the domain gone, its libvirtd gone) must not run under the default policy, nor be
    placed as if it had no anti-affinity group."""
    assert policy_name(hv.lookupByName(GUEST)) is None
    assert anti_affinity_group(hv.lookupByName(GUEST)) is None
    dom = hv.createXML(seam.IDLE_XML.format(name="vanishing"), 0)  # running, never defined
    dom.destroy()  # gone under the reader: libvirt's "no domain", not "no metadata"
    with pytest.raises(libvirt.libvirtError):
        policy_name(dom)
    with pytest.raises(libvirt.libvirtError):
        anti_affinity_group(dom)


def test_the_worker_checks_the_evacuations_policy_again_when_it_plans(
    env: Path,
    store: JobStore,
    hv: libvirt.virConnect,
    tmp_path: Path,
) -> None:
    records = EvacuationStore(store)
    # Created by a producer whose registry knew `gone`; this worker's does not.
    evacuation_id = records.create(EvacuationSpec(host="kvm1", policy="gone"), "test", signer=None)
    records.transition(evacuation_id, EvacuationState.PLANNING)
    plan_and_queue_or_fail(
        seam.runtime(store, "kvm1", tmp_path), records, records.get(evacuation_id)
    )
    ended = records.get(evacuation_id)
    assert ended.state is EvacuationState.FAILED
    assert ended.reason is not None
    assert ended.reason.startswith("planning failed: unknown policy 'gone' (known policies:")
