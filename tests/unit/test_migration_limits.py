"""A host's own `max_inbound` and `max_outbound`, kept by its worker whatever Redis says.

Admission's slot sets can be deleted by anyone with a Redis password (`DEL
drover:slots:out:kvm1`), and every queued guest is then let in. The destination's prepare
counts the bookings its ledger holds, the source's perform the guests its ledger says it
sends (each while libvirt runs a job on it); a host at its limit waits `limit_wait`, then
refuses, nothing booked or moved. Against the real test Redis, a real ledger, and libvirt's
test driver.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import libvirt
import pytest
from structlog.testing import capture_logs

from jobs.keys import job_key
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from tests.unit import test_libvirt_seam as seam
from tests.unit.test_hostile_fleet_keys_reservations import Memory
from worker.destination_room import take_room
from worker.migration_limits import sending
from worker.phase_errors import HandedOver, PhaseCancelled, PhaseFailed
from worker.runtime import Runtime

env = seam.env
hv = seam.hv
NEED_MIB = 64
ROOMY_MIB = 65_536  # libvirt's free memory: room is never what stops a guest here
WAIT_DEADLINE_S = 10.0  # how long a test waits for a waiting phase to say so
OTHER_UUID = "00000000-0000-0000-0000-000000000002"  # a guest the test libvirt has not


def limited(config: Path, *, inbound: int = 2, outbound: int = 2, wait: float = 0.0) -> None:
    """kvm1 and kvm2 with these limits; phases wait `wait` s, looking every 10 ms."""
    limits = f"max_inbound = {inbound}\nmax_outbound = {outbound}\n"
    config.write_text(
        config.read_text()
        + f"\n[hosts.kvm1.limits]\n{limits}\n[hosts.kvm2.limits]\n{limits}"
        + f"\n[tunables]\nlimit_wait = {wait}\nadmission_interval = 0.01\n"
    )


def live_job(store: JobStore, domain: str) -> str:
    job_id = store.create(MigrationSpec(domain=domain, src="kvm1", dst="kvm2"), host="test")
    store.transition(job_id, JobState.PREFLIGHT, host="test")
    return job_id


@pytest.fixture
def dst(env: Path, store: JobStore, tmp_path: Path) -> Runtime:
    """kvm2's worker, with room for any guest here."""
    rt = seam.runtime(store, "kvm2", tmp_path)
    rt.libvirt = cast(Any, SimpleNamespace(conn=Memory(ROOMY_MIB)))
    return rt


@pytest.fixture
def src(env: Path, store: JobStore, tmp_path: Path, hv: libvirt.virConnect) -> Runtime:
    return seam.runtime(store, "kvm1", tmp_path)


def said(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def when_said(logs: list[MutableMapping[str, Any]], name: str, then: Any) -> threading.Thread:
    """A thread that runs `then` once `name` has been logged (or fails the wait)."""

    def run() -> None:
        deadline = time.monotonic() + WAIT_DEADLINE_S
        while not said(logs, name):
            assert time.monotonic() < deadline, f"{name} never said"
            time.sleep(0.01)
        then()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# --- the destination: max_inbound ---------------------------------------------------------


def test_a_destination_at_its_max_inbound_refuses_one_more_and_books_nothing(
    env: Path, store: JobStore, dst: Runtime
) -> None:
    limited(env, inbound=1)
    first, second = live_job(store, "web01"), live_job(store, "web02")
    assert take_room(dst, store.get(first), NEED_MIB) is None
    refusal = take_room(dst, store.get(second), NEED_MIB)
    assert refusal == f"kvm2 already takes 1 guests ({first}); its max_inbound is 1"
    assert dst.ledger.booked_jobs("") == [(first, NEED_MIB)]  # nothing booked for the second

    dst.ledger.release_booking(first)  # its finish
    assert take_room(dst, store.get(second), NEED_MIB) is None
    assert dst.ledger.booked_jobs("") == [(second, NEED_MIB)]


def test_a_destination_waits_for_a_booking_released_meanwhile(
    env: Path, store: JobStore, dst: Runtime
) -> None:
    """The moment a failed job's booking waits for its rollback: the next guest waits and
    says why, then books once the booking is gone."""
    limited(env, inbound=1, wait=WAIT_DEADLINE_S)
    first, second = live_job(store, "web01"), live_job(store, "web02")
    assert take_room(dst, store.get(first), NEED_MIB) is None
    with capture_logs() as logs:
        release = when_said(logs, "job.waiting", lambda: dst.ledger.release_booking(first))
        assert take_room(dst, store.get(second), NEED_MIB) is None
        release.join()
    (waiting,) = said(logs, "job.waiting")
    assert waiting["reason"] == f"kvm2 already takes 1 guests ({first}); its max_inbound is 1"
    assert dst.ledger.booked_jobs("") == [(second, NEED_MIB)]


def test_a_job_aborted_while_it_waits_stops_waiting_and_books_nothing(
    env: Path, store: JobStore, dst: Runtime
) -> None:
    limited(env, inbound=1, wait=WAIT_DEADLINE_S)
    first, second = live_job(store, "web01"), live_job(store, "web02")
    assert take_room(dst, store.get(first), NEED_MIB) is None
    with capture_logs() as logs:
        abort = when_said(logs, "job.waiting", lambda: store.request_abort(second, "operator"))
        with pytest.raises(PhaseCancelled, match=r"operator while it waited .*nothing moved"):
            take_room(dst, store.get(second), NEED_MIB)
        abort.join()
    assert dst.ledger.booked_jobs("") == [(first, NEED_MIB)]


def test_slot_sets_deleted_let_in_only_what_the_ledger_has_room_for(
    env: Path, store: JobStore, dst: Runtime
) -> None:
    """Every guest let in at once (the slot sets deleted): kvm2 books two, refuses the rest,
    whatever Redis says of the limits."""
    limited(env, inbound=2)
    jobs = [live_job(store, f"web0{n}") for n in range(1, 6)]
    for key in store.r.scan_iter("drover:slots:*"):
        store.r.delete(key)
    with ThreadPoolExecutor(len(jobs)) as pool:
        verdicts = list(pool.map(lambda j: take_room(dst, store.get(j), NEED_MIB), jobs))
    assert sum(v is None for v in verdicts) == 2, verdicts
    assert all("its max_inbound is 2" in v for v in verdicts if v is not None)
    assert len(dst.ledger.booked_jobs("")) == 2


def test_the_booking_of_a_job_no_record_is_left_of_counts_no_more(
    env: Path, store: JobStore, dst: Runtime
) -> None:
    """As for the room: no record left, and no guest of it coming in, its booking holds
    nothing (a record deleted by hand must not keep the host full for ever)."""
    limited(env, inbound=1)
    first, second = live_job(store, "web01"), live_job(store, "web02")
    assert take_room(dst, store.get(first), NEED_MIB) is None
    store.r.delete(job_key(first))
    assert take_room(dst, store.get(second), NEED_MIB) is None


# --- the source: max_outbound -------------------------------------------------------------


@pytest.fixture
def guest_uuid(hv: libvirt.virConnect) -> str:
    return str(hv.lookupByName(seam.GUEST).UUIDString())


def test_a_source_at_its_max_outbound_refuses_one_more_until_the_first_is_sent(
    env: Path, store: JobStore, src: Runtime, guest_uuid: str
) -> None:
    limited(env, outbound=1)
    first, second = store.get(live_job(store, "web01")), store.get(live_job(store, "web02"))
    other_uuid = OTHER_UUID
    with (
        sending(src, first, guest_uuid),
        pytest.raises(PhaseFailed) as refused,
        sending(src, second, other_uuid),
    ):
        pytest.fail("a second guest sent past max_outbound 1")
    assert str(refused.value) == (
        f"kvm1 already sends 1 guests ({first.id}); its max_outbound is 1; nothing moved"
    )
    with sending(src, second, guest_uuid):  # the first one's perform ended
        assert [s.job_id for s in src.ledger.sending("")] == [second.id]
    assert src.ledger.sending("") == []


def test_two_performs_starting_at_once_are_not_both_let_through(
    env: Path, store: JobStore, src: Runtime, guest_uuid: str
) -> None:
    limited(env, outbound=1)
    jobs = [store.get(live_job(store, f"web0{n}")) for n in range(1, 5)]
    inside = threading.Event()
    others_done = threading.Barrier(len(jobs))

    def perform(job: Any) -> str | None:
        try:
            with sending(src, job, guest_uuid):
                inside.set()
                others_done.wait(WAIT_DEADLINE_S)  # held until every other has tried
                return None
        except PhaseFailed as exc:
            others_done.wait(WAIT_DEADLINE_S)
            return str(exc)

    with ThreadPoolExecutor(len(jobs)) as pool:
        verdicts = list(pool.map(perform, jobs))
    assert inside.is_set() and sum(v is None for v in verdicts) == 1, verdicts


def test_a_guest_whose_perform_died_counts_while_libvirt_runs_its_migration_only(
    env: Path, store: JobStore, src: Runtime, guest_uuid: str
) -> None:
    """A perform whose worker was killed left its row: it counts for `heartbeat_ttl` (its
    libvirt job may not have begun), then only while libvirt runs a job on its guest (the
    test guest runs none): then it is dropped, and the next guest goes."""
    limited(env, outbound=1)
    dead, nxt = live_job(store, "web01"), store.get(live_job(store, "web02"))
    src.ledger.start_sending(dead, guest_uuid, time.time())
    with (
        pytest.raises(PhaseFailed, match="kvm1 already sends 1 guests"),
        sending(src, nxt, OTHER_UUID),
    ):
        pytest.fail("a fresh row did not count")
    long_ago = time.time() - 2 * src.settings.tunables.heartbeat_ttl
    src.ledger.start_sending(dead, guest_uuid, long_ago)
    with sending(src, nxt, OTHER_UUID):
        assert [s.job_id for s in src.ledger.sending("")] == [nxt.id]  # the dead one's gone


def test_a_migration_handed_over_to_the_next_worker_still_counts(
    env: Path, store: JobStore, src: Runtime, guest_uuid: str
) -> None:
    """A draining worker hands its migration over: libvirt still runs it, so its row stays
    (counted while libvirt shows the migration; then dropped as above)."""
    limited(env, outbound=1)
    job = store.get(live_job(store, "web01"))
    with pytest.raises(HandedOver), sending(src, job, guest_uuid):
        raise HandedOver("lab1's worker is shutting down")
    assert [s.job_id for s in src.ledger.sending("")] == [job.id]
    second = store.get(live_job(store, "web02"))
    with (
        pytest.raises(PhaseFailed, match="its max_outbound is 1"),
        sending(src, second, OTHER_UUID),
    ):
        pytest.fail("a handed-over migration did not count")


def test_a_guest_another_job_sends_is_refused_at_once_whatever_the_limit(
    env: Path, store: JobStore, src: Runtime, guest_uuid: str
) -> None:
    """A second job for a guest this host is sending (its Redis lease deleted, probe) fails
    before its migration call, with the first job named; once the first's row is stale (its
    worker dead, libvirt running no job on the guest), the guest may go again."""
    limited(env, outbound=4)
    first, second = store.get(live_job(store, "web01")), store.get(live_job(store, "web01"))
    with sending(src, first, guest_uuid):
        with pytest.raises(PhaseFailed) as refused, sending(src, second, guest_uuid):
            pytest.fail("a second job sent the guest the first one sends")
        assert str(refused.value) == (
            f"web01 is on its way out of kvm1 already, in job {first.id} (this host's "
            "ledger); nothing moved"
        )
        with sending(src, second, OTHER_UUID):  # another guest: only the limit counts
            pass
    long_ago = time.time() - 2 * src.settings.tunables.heartbeat_ttl
    src.ledger.start_sending(first.id, guest_uuid, long_ago)
    with sending(src, second, guest_uuid):
        assert [s.job_id for s in src.ledger.sending("")] == [second.id]


@pytest.fixture
def no_leftover_rows(src: Runtime) -> Iterator[None]:
    yield
    assert src.ledger.sending("") == []


def test_a_failed_migration_gives_its_place_back(
    env: Path, store: JobStore, src: Runtime, guest_uuid: str, no_leftover_rows: None
) -> None:
    limited(env, outbound=1)
    job = store.get(live_job(store, "web01"))
    with (
        pytest.raises(PhaseFailed, match="migration to kvm2 failed"),
        sending(src, job, guest_uuid),
    ):
        raise PhaseFailed("migration to kvm2 failed: connection refused")
