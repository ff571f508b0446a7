"""The spec-to-libvirt mapping: which API, which flags, which parameters."""

from __future__ import annotations

import libvirt
import pytest

from config.settings import Settings
from jobs.policy_choice import effective_policy
from jobs.record import Handoff
from jobs.spec import MigrationSpec
from worker.convergence import ConvergencePolicy
from worker.migration_call import MigrationCall, build_call, flag_names
from worker.monitor import Progress

HANDOFF = Handoff(dconnuri="qemu+tcp://10.0.0.2/system", migrate_uri="tcp://10.0.0.2")


def call_of(s: MigrationSpec, handoff: Handoff) -> MigrationCall:
    """The call a worker with no drover.toml policies builds (the shipped default policy)."""
    return build_call(s, handoff, effective_policy(Settings(), s).values)


def spec(**kw: object) -> MigrationSpec:
    return MigrationSpec.model_validate({"domain": "web01", "src": "a", "dst": "b", **kw})


def test_default_is_live_peer_to_peer_native_with_migration_uri() -> None:
    call = call_of(spec(), HANDOFF)
    assert call.api == "migrateToURI3"
    assert call.dconnuri == "qemu+tcp://10.0.0.2/system"
    # The shipped default policy allows post-copy: the flag is set, the switch is the monitor's.
    assert call.flags == (
        libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_POSTCOPY
    )
    assert call.params == {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.0.0.2"}


def test_requested_options_all_reach_the_call() -> None:
    call = call_of(
        spec(persistent=True, undefine_source=True, auto_converge=True, bandwidth_mib=64),
        HANDOFF,
    )
    assert set(flag_names(call.flags)) == {
        "VIR_MIGRATE_LIVE",
        "VIR_MIGRATE_PEER2PEER",
        "VIR_MIGRATE_PERSIST_DEST",
        "VIR_MIGRATE_UNDEFINE_SOURCE",
        "VIR_MIGRATE_AUTO_CONVERGE",
        "VIR_MIGRATE_POSTCOPY",  # the default policy allows it
    }
    assert call.params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 64
    # auto-converge's throttle steps are the policy's (QEMU's own 20 and 10 by default)
    assert call.params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] == 20
    assert call.params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] == 10


def test_non_live_request_drops_the_live_flag() -> None:
    assert not call_of(spec(live=False), HANDOFF).flags & libvirt.VIR_MIGRATE_LIVE


def _progress(elapsed_ms: int) -> Progress:
    return Progress("transfer", elapsed_ms, 100, 50, 50, 10, 5, 2, None)


def test_policy_aborts_only_past_the_deadline() -> None:
    policy = ConvergencePolicy(max_duration_s=10)
    assert policy.decide(_progress(9_999)).kind == "continue"
    decision = policy.decide(_progress(10_001))
    assert decision.kind == "abort" and "not converged after 10s" in decision.reason


def test_a_completion_timeout_acts_once_then_leaves_the_hard_limit_to_abort() -> None:
    timed = spec(completion_timeout_s=5, timeout_action="suspend")
    policy = ConvergencePolicy.for_job(timed, max_duration_s=60)
    assert policy.decide(_progress(4_999)).kind == "continue"
    first = policy.decide(_progress(5_001))
    assert first.kind == "suspend" and "completion timeout of 5s" in first.reason
    assert policy.decide(_progress(6_000)).kind == "continue"  # suspended once, not again
    assert policy.decide(_progress(60_001)).kind == "abort"


@pytest.mark.parametrize("action", ["postcopy", "abort"])
def test_the_timeout_action_is_the_one_asked_for(action: str) -> None:
    timed = spec(completion_timeout_s=5, timeout_action=action, postcopy=action == "postcopy")
    assert ConvergencePolicy.for_job(timed, max_duration_s=60).decide(_progress(5_001)).kind == (
        action
    )


def test_without_a_completion_timeout_only_the_hard_limit_acts() -> None:
    policy = ConvergencePolicy.for_job(spec(), max_duration_s=60)
    assert policy.decide(_progress(59_000)).kind == "continue"
