"""A host's worker holds its host in maintenance once it has seen it disabled, until it reads
a `drover host enable` a trusted key signed after that: the entry deleted from Redis by hand
(the attacker probe: a queued migration's guest then arrived on a host in maintenance) puts
no guest there. Against the real test Redis, with signing on (the registry's fleet keys)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from config.settings import Settings
from jobs.keys import DISABLED_HOSTS
from jobs.maintenance import Maintenance
from jobs.request_signing import signer_for
from jobs.store import JobStore
from tests.unit.test_forged_evacuation import keys, rt, settings
from worker import maintenance_kept
from worker.maintenance_kept import maintenance_refusal
from worker.runtime import Runtime

__all__ = ["keys", "rt", "settings"]  # fixtures, used by name


def test_a_disable_deleted_from_redis_still_refuses_until_a_signed_enable(
    rt: Runtime, store: JobStore, settings: Settings
) -> None:
    maintenance = Maintenance(store.r)
    maintenance.disable("kvm1", "firmware", by="producer@test")
    assert "kvm1 is disabled for maintenance" in str(maintenance_refusal(rt))  # seen here
    store.r.hdel(DISABLED_HOSTS, "kvm1")  # by hand
    with capture_logs() as logs:
        kept = maintenance_refusal(rt)
        assert maintenance_refusal(rt) == kept  # said once
    assert kept is not None and "without a signed `drover host enable kvm1`" in kept
    assert [e["event"] for e in logs] == ["security.rejected"]
    assert maintenance.enable("kvm1", signer_for(settings.security), "producer@test") is False
    assert maintenance_refusal(rt) is None  # the operator's signed enable
    assert rt.ledger.disabled_since("kvm1") is None


def test_an_enable_signed_before_the_disable_was_seen_does_not_count(
    rt: Runtime, store: JobStore, settings: Settings
) -> None:
    """A signed enable kept from an earlier maintenance, written back after the entry of a
    new one was deleted, does not end the new one."""
    maintenance = Maintenance(store.r)
    maintenance.disable("kvm1", "firmware", by="producer@test")
    assert maintenance.enable("kvm1", signer_for(settings.security), "producer@test")
    old_enable = maintenance.signed_enable("kvm1")
    rt.ledger.note_disabled("kvm1", datetime.now(UTC) + timedelta(hours=1))  # seen later
    store.r.hset("drover:hosts:enabled", "kvm1", old_enable or "")
    kept = maintenance_refusal(rt)
    assert kept is not None and "was signed at" in kept and "before" in kept


def test_an_enable_written_by_hand_does_not_count(
    rt: Runtime, store: JobStore, settings: Settings
) -> None:
    maintenance = Maintenance(store.r)
    maintenance.disable("kvm1", "firmware", by="producer@test")
    assert maintenance_refusal(rt) is not None
    store.r.hdel(DISABLED_HOSTS, "kvm1")
    store.r.hset("drover:hosts:enabled", "kvm1", '{"payload": "x", "signature": "y"}')
    kept = maintenance_refusal(rt)
    assert kept is not None and "the one in Redis:" in kept


def test_with_signing_off_a_deleted_entry_is_an_enable(
    rt: Runtime, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maintenance_kept, "verifier_for", lambda _security: None)  # a lab
    maintenance = Maintenance(store.r)
    maintenance.disable("kvm1", "firmware", by="producer@test")
    assert maintenance_refusal(rt) is not None
    store.r.hdel(DISABLED_HOSTS, "kvm1")
    assert maintenance_refusal(rt) is None


def test_an_enable_signed_between_two_disables_does_not_end_the_second(
    rt: Runtime, store: JobStore, settings: Settings
) -> None:
    """The operator disables kvm1 (its worker sees it), enables it and, a while later,
    disables it again, all while the worker is away. Back, it sees the second disable; the
    entry is then deleted by hand. The enable was signed before the second disable was seen:
    it ends nothing (attacker probe: the ledger kept the first sighting only, and the old
    enable counted; a guest landed on the host in its second maintenance)."""
    maintenance = Maintenance(store.r)
    maintenance.disable("kvm1", "firmware", by="producer@test")
    first_look = datetime.now(UTC) - timedelta(minutes=5)
    rt.ledger.note_disabled("kvm1", first_look)  # the first maintenance, seen then
    assert maintenance.enable("kvm1", signer_for(settings.security), "producer@test")
    maintenance.disable("kvm1", "firmware again", by="producer@test")
    skew = timedelta(seconds=settings.tunables.host_facts_max_skew)
    back = datetime.now(UTC) + 2 * skew  # the worker back, later than the clocks' skew
    rt.ledger.note_disabled("kvm1", back)  # what its keeper's tick records
    assert rt.ledger.disabled_since("kvm1") == back
    rt.ledger.note_disabled("kvm1", first_look)  # an older look never moves it back
    assert rt.ledger.disabled_since("kvm1") == back
    store.r.hdel(DISABLED_HOSTS, "kvm1")  # by hand
    kept = maintenance_refusal(rt)
    assert kept is not None and "was signed at" in kept and "before" in kept
