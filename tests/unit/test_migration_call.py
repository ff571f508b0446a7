"""The spec-to-libvirt mapping: which API, which flags, which parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import libvirt
import pytest

from config.settings import Settings
from jobs.policy_choice import effective_policy
from jobs.record import Handoff
from jobs.spec import MigrationSpec
from worker.libvirt_host import Domain, LibvirtUnavailable, Opener, UnsafeURI
from worker.migration_call import MigrationCall, build_call, flag_names, invoke
from worker.phase_perform import CallOutcome, call_outcome

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


class _Dest:
    """A destination connection that says whether it was closed."""

    closed = False

    def close(self) -> int:
        self.closed = True
        return 0


class _Dom:
    """A domain that records the migration calls made on it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def migrate3(self, dconn: object, params: dict[str, object], flags: int) -> None:
        self.calls.append(("migrate3", dconn))


def test_managed_direct_reaches_the_destination_through_the_bounded_seam() -> None:
    """The destination conn a managed-direct call needs comes from the seam's `reach` (the
    registry's allowlist, within peer_timeout, with keepalive: worker/peer_open.py), is
    handed to libvirt and closed after; a destination that cannot be reached ends the call
    before libvirt is asked to move anything."""
    call = call_of(spec(control="direct"), HANDOFF)
    assert call.api == "migrate3" and call.dest_connection_uri == HANDOFF.dconnuri
    dest, dom, asked = _Dest(), _Dom(), []

    def reach(uri: str) -> _Dest:
        asked.append(uri)
        return dest

    invoke(cast(Domain, dom), call, cast(Opener, reach))
    assert asked == [HANDOFF.dconnuri] and dom.calls == [("migrate3", dest)] and dest.closed

    def unreachable(uri: str) -> _Dest:
        raise LibvirtUnavailable(f"cannot reach {uri}: no answer within 3 s")

    untouched = _Dom()
    with pytest.raises(LibvirtUnavailable, match="no answer"):
        invoke(cast(Domain, untouched), call, cast(Opener, unreachable))
    assert untouched.calls == []


def _raising(exc: Exception) -> Callable[[], None]:
    def call() -> None:
        raise exc

    return call


def test_whatever_the_migration_call_raises_is_a_failure_never_a_migration() -> None:
    """perform runs the call in a thread of its own and reads how it returned: an error other
    than libvirt's (the destination not reached, a refused URI, a bug) must fail the job like
    libvirt's, never pass for a migration that went through."""
    assert call_outcome(lambda: None) == CallOutcome(failed=False, error=None)
    refused = libvirt.libvirtError("operation failed: migration job: unexpectedly failed")
    cases: list[tuple[Exception, str]] = [
        (refused, "unexpectedly failed"),
        (LibvirtUnavailable("cannot reach qemu+tcp://b/system: no answer within 3s"), "no answer"),
        (UnsafeURI("qemu+ext://b/system?command=/bin/sh: scheme not allowed"), "not allowed"),
        (TypeError(), "TypeError"),
    ]
    for exc, said in cases:
        outcome = call_outcome(_raising(exc))
        assert outcome.failed and outcome.error is not None and said in outcome.error, exc
