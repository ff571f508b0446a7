"""The source worker refuses a tune request's post-copy bandwidth for a job whose effective
policy (as the worker computes it, not as Redis records it) forbids post-copy, and then applies
nothing of that request: a request written into Redis by hand, or sent by a producer that does
not check, is refused whole, like the `drover tune` the operator typed.

Against libvirt's `test:///default` driver, whose domain `test` stands for the migrating guest;
the driver has no migration, so the statistics libvirt would give of one are the seam, and the
limits the worker sets are recorded on the domain instead of being sent to a driver that has
no migrateSetMaxSpeed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from structlog.testing import capture_logs

import worker.migration_control as control
from config.policy_model import BUILTIN_POLICIES, EffectivePolicy
from jobs.abort import TooLate, abort_job
from jobs.control import push_tune, tune_request
from jobs.keys import tune_key
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from tests.support.job_locks import job_lock_held
from tests.support.libvirt_errors import libvirt_error
from worker import switch_asked
from worker.convergence import Decision
from worker.ledger import Ledger
from worker.libvirt_host import LibvirtHost
from worker.migration_watch import _policy_switch
from worker.phase_errors import PhaseFailed
from worker.runtime import Runtime

TEST_URI = "test:///default"
POSTCOPY_SPEED = libvirt.VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY
REQUEST = "task-1"  # the tune task's id, under which its request waits
GATE_S = 5.0


class Recorded:
    """The test driver's domain, with the migration limits set on it recorded (in order)."""

    def __init__(self, dom: libvirt.virDomain) -> None:
        self.dom = dom
        self.set: list[tuple[str, int, int]] = []
        self.refuse_switch = False
        self.switch_gate: threading.Event | None = None  # a switch held inside libvirt's call
        self.switching = threading.Event()
        self.shown: tuple[int, int] | None = None  # libvirt's state, when a test says

    def state(self, flags: int = 0) -> tuple[int, int]:  # libvirt's name
        return self.shown or self.dom.state(flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dom, name)

    def migrateSetMaxSpeed(self, value: int, flags: int) -> int:  # libvirt's name
        self.set.append(("speed", value, flags))
        return 0

    def migrateSetMaxDowntime(self, value: int, flags: int) -> int:  # libvirt's name
        self.set.append(("downtime", value, flags))
        return 0

    def migrateStartPostCopy(self, flags: int = 0) -> int:  # libvirt's name
        self.switching.set()
        if self.switch_gate is not None:
            assert self.switch_gate.wait(GATE_S), "the switch was never let through"
        if self.refuse_switch:
            raise libvirt_error(
                libvirt.VIR_ERR_OPERATION_FAILED, "QEMU refused", libvirt.VIR_FROM_QEMU
            )
        self.set.append(("postcopy", 0, flags))
        return 0

    def suspend(self) -> int:
        self.set.append(("suspend", 0, 0))
        return 0


@pytest.fixture
def guest(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorded]:
    """The job's guest on kvm1, migrating out as libvirt's statistics say."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(TEST_URI)
    recorded = Recorded(conn.lookupByName("test"))
    monkeypatch.setattr(control, "job_domain", lambda _rt, _job, _name: recorded)
    outgoing = {"operation": libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT, "memory_total": 1}
    monkeypatch.setattr(control, "migration_stats", lambda _dom: outgoing)
    yield recorded
    conn.close()


@pytest.fixture
def rt(config: Path, monkeypatch: pytest.MonkeyPatch, store: JobStore, tmp_path: Path) -> Runtime:
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    seam = LibvirtHost(TEST_URI, opener=lambda _uri: libvirt.open(TEST_URI))
    return Runtime("kvm1", store, seam, Ledger(str(tmp_path / "ledger")))


def migrating(store: JobStore, policy: str) -> str:
    spec = MigrationSpec(domain="test", src="kvm1", dst="kvm2", live=True, policy=policy)
    job_id = store.create(spec, host="kvm1")
    for state in (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING):
        assert store.transition(job_id, state, host="kvm1")[0]
    return job_id


def ask(store: JobStore, job_id: str) -> None:
    """What a producer that does not check (or a hand in Redis) puts in line."""
    request = tune_request(bandwidth_mib=5, postcopy_bandwidth_mib=50, max_downtime_ms=300)
    push_tune(store.r, job_id, REQUEST, request, ttl_s=60)


def test_a_postcopy_bandwidth_under_a_policy_forbidding_post_copy_applies_nothing(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    job_id = migrating(store, "no-postcopy")
    # The record in Redis says the job runs with `default` (post-copy allowed): a lie the
    # worker does not go by; it computes the policy from its registry and the domain.
    allowing = BUILTIN_POLICIES["default"]
    store.update(job_id, policy=EffectivePolicy(name="default", values=allowing, sources={}))
    ask(store, job_id)
    with capture_logs() as logs, pytest.raises(PhaseFailed) as refused:
        control.tune(rt, store.get(job_id), REQUEST)
    said = str(refused.value)
    assert "\n" not in said
    assert "policy no-postcopy, which does not allow post-copy" in said
    assert "nothing of this tune request was applied" in said
    assert guest.set == []  # neither the bandwidth nor the downtime of the same request
    assert not [log for log in logs if log["event"] == "policy.step"]
    assert store.r.hlen(tune_key(job_id)) == 0  # taken, not left for a later tune to apply


def test_a_postcopy_bandwidth_is_applied_where_the_policy_allows_post_copy(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    job_id = migrating(store, "default")
    ask(store, job_id)
    with capture_logs() as logs:
        control.tune(rt, store.get(job_id), REQUEST)
    assert guest.set == [("speed", 5, 0), ("speed", 50, POSTCOPY_SPEED), ("downtime", 300, 0)]
    steps = [log for log in logs if log["event"] == "policy.step"]
    assert len(steps) == 1 and steps[0]["postcopy_bandwidth_mib"] == 50


def test_a_tune_without_a_postcopy_figure_is_applied_under_any_policy(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    job_id = migrating(store, "no-postcopy")
    push_tune(store.r, job_id, REQUEST, tune_request(bandwidth_mib=7), ttl_s=60)
    control.tune(rt, store.get(job_id), REQUEST)
    assert guest.set == [("speed", 7, 0)]


IN_POSTCOPY = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY)


def test_pre_copy_limits_asked_in_post_copy_are_refused_whole(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    """Probe: after the switch, `drover tune --bandwidth 20` was answered "bandwidth_mib=20"
    though pre-copy's limits change nothing any more."""
    job_id = migrating(store, "default")
    guest.shown = IN_POSTCOPY
    ask(store, job_id)  # bandwidth, post-copy bandwidth and downtime
    with pytest.raises(PhaseFailed) as refused:
        control.tune(rt, store.get(job_id), REQUEST)
    said = str(refused.value)
    assert "in post-copy: --bandwidth and --max-downtime no longer apply" in said
    assert "nothing of this tune request was applied" in said and guest.set == []
    push_tune(store.r, job_id, REQUEST, tune_request(postcopy_bandwidth_mib=0), ttl_s=60)
    control.tune(rt, store.get(job_id), REQUEST)  # what governs post-copy still applies
    assert guest.set == [("speed", 0, POSTCOPY_SPEED)]


# --- the operator's switch to post-copy, against the operator's abort ----------------------


def test_an_abort_requested_first_refuses_the_operators_switch_and_force_complete(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    """A probe sent `drover abort` and then `drover postcopy` (or force-complete): the abort
    was accepted, the switch made, and the guest landed. Now the switch is refused; the
    abort stays requested for the monitor to carry out."""
    job_id = migrating(store, "default")
    store.request_abort(job_id, "ops: stop it")
    moves = {
        "postcopy": lambda: control.start_postcopy(rt, store.get(job_id)),
        "force-complete": lambda: control.force_complete(rt, store.get(job_id)),
    }
    for name, move in moves.items():
        with pytest.raises(PhaseFailed) as refused:
            move()
        said = str(refused.value)
        assert "is being aborted (ops: stop it)" in said and "\n" not in said, name
    assert guest.set == []  # neither switched nor paused
    assert store.get(job_id).postcopy_since is None
    assert store.abort_requested(job_id) == "ops: stop it"


def test_an_abort_kept_from_its_notice_refuses_the_switch_when_its_flag_is_deleted(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    """The abort's flag deleted in Redis (attacker probe): this host's record of the
    operator's signed notice still refuses a switch or a pause that would land the guest;
    libvirt refusing that abort (post-copy) withdraws it on this host too."""
    job_id = migrating(store, "default")
    rt.ledger.note_abort_asked(job_id, "ops: stop it")
    assert store.abort_requested(job_id) is None  # the flag: deleted
    moves = {
        "postcopy": lambda: control.start_postcopy(rt, store.get(job_id)),
        "force-complete": lambda: control.force_complete(rt, store.get(job_id)),
    }
    for move in moves.values():
        with pytest.raises(PhaseFailed, match=r"is being aborted \(ops: stop it\)"):
            move()
    assert guest.set == []  # neither switched nor paused
    assert store.get(job_id).postcopy_since is None
    rt.ledger.withdraw_abort_asked(job_id)
    assert rt.ledger.abort_asked(job_id) is None


def test_a_switch_made_first_makes_a_later_abort_too_late(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    job_id = migrating(store, "default")
    control.start_postcopy(rt, store.get(job_id))
    assert guest.set == [("postcopy", 0, 0)]
    with pytest.raises(TooLate, match="in post-copy"):
        abort_job(store, job_id, by="ops", rollback=lambda _: None)
    assert store.abort_requested(job_id) is None


def test_a_switch_libvirt_refuses_takes_its_mark_back(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    """The switch is marked before libvirt is asked; refused, the mark goes, and the
    operator's abort is accepted again."""
    job_id = migrating(store, "default")
    guest.refuse_switch = True
    with pytest.raises(PhaseFailed, match="libvirt refused the switch to post-copy"):
        control.start_postcopy(rt, store.get(job_id))
    assert store.get(job_id).postcopy_since is None
    said = abort_job(store, job_id, by="ops", rollback=lambda _: None)
    assert said.startswith("abort requested")


def test_a_migration_libvirt_shows_in_post_copy_is_not_switched_again(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    """Probe: `drover postcopy` asked again in post-copy was made again (a second
    `migration.postcopy_started`) and moved the record's moment of the switch."""
    job_id = migrating(store, "default")
    control.start_postcopy(rt, store.get(job_id))
    since = store.get(job_id).postcopy_since
    guest.shown = IN_POSTCOPY
    with pytest.raises(PhaseFailed, match="already in post-copy: it completes on its own"):
        control.start_postcopy(rt, store.get(job_id))
    assert guest.set == [("postcopy", 0, 0)]  # once
    assert store.get(job_id).postcopy_since == since


def test_a_switch_asked_during_libvirts_setup_waits_for_the_transfer(
    rt: Runtime, store: JobStore, guest: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe: asked while libvirt still set the migration up, QEMU refused the switch
    ("Enable postcopy with migrate_set_capability before the start of migration") and the
    request was lost. It now waits, as tune and force-complete do."""
    setup = {"operation": libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT, "memory_total": 0}
    answers = [setup, setup, setup | {"memory_total": 1}]
    monkeypatch.setattr(control, "migration_stats", lambda _dom: answers.pop(0))
    job_id = migrating(store, "default")
    control.start_postcopy(rt, store.get(job_id))
    assert answers == [] and guest.set == [("postcopy", 0, 0)]


def at_once(first: Callable[[], None], second: Callable[[], None], guest: Recorded) -> list[str]:
    """`first` inside libvirt's switch when `second` is asked; what each said ("" when done)."""
    said: dict[str, str] = {}

    def run(name: str, move: Callable[[], None]) -> None:
        try:
            move()
            said[name] = ""
        except PhaseFailed as exc:
            said[name] = str(exc)

    guest.switch_gate = threading.Event()
    one = threading.Thread(target=run, args=("first", first))
    one.start()
    assert guest.switching.wait(GATE_S)
    two = threading.Thread(target=run, args=("second", second))
    two.start()
    two.join(0.2)
    guest.switch_gate.set()
    one.join(GATE_S)
    two.join(GATE_S)
    return [said["first"], said["second"]]


@pytest.mark.parametrize("second", ["force-complete", "postcopy"])
def test_a_second_switch_asked_during_the_first_is_refused_not_answered_switched(
    rt: Runtime, store: JobStore, guest: Recorded, second: str
) -> None:
    """Probe: two force-completes asked together were both answered "switched". Each task
    read the job's record when it began, before either switch was marked in it."""
    job_id = migrating(store, "default")
    read_first = store.get(job_id)
    moves = {
        "force-complete": lambda: control.force_complete(rt, read_first),
        "postcopy": lambda: control.start_postcopy(rt, read_first),
    }
    with capture_logs() as logs:
        said = at_once(moves["force-complete"], moves[second], guest)
    assert said[0] == "" and "already in post-copy: it completes on its own" in said[1], said
    assert guest.set == [("postcopy", 0, 0)]  # one switch
    assert [log["event"] for log in logs].count("migration.postcopy_started") == 1
    switch_asked.taken(job_id)


def test_the_policys_switch_after_the_operators_is_said_and_not_made(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    job_id = migrating(store, "default")
    decision = Decision("postcopy", "stalled", "the policy's", {"remaining_mib": 3})
    control.start_postcopy(rt, store.get(job_id))
    with capture_logs() as logs:
        assert not _policy_switch(rt, store.get(job_id), guest, decision)  # type: ignore[arg-type]
    assert guest.set == [("postcopy", 0, 0)]
    (step,) = [log for log in logs if log["event"] == "policy.step"]
    assert step["done"] is False and step["held_by"] == "operator"
    assert switch_asked.asked(job_id)  # the operator's switch is still the one asked
    switch_asked.taken(job_id)


def test_a_forged_postcopy_mark_does_not_stop_force_complete(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    """Probe: `postcopy_since` written into the record during pre-copy made force-complete
    answer "already in post-copy"; libvirt's state says otherwise and has the last word."""
    job_id = migrating(store, "default")
    store.r.hset(f"drover:job:{job_id}", "postcopy_since", "2026-12-04T22:00:00+00:00")
    control.force_complete(rt, store.get(job_id))
    assert guest.set == [("postcopy", 0, 0)]
    switch_asked.taken(job_id)


def test_a_control_behind_one_libvirt_has_not_answered_is_refused_not_queued(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    """Probe: with the guest's QEMU stopped, every `drover tune` blocked a worker thread for
    libvirt's 30 s, and an unrelated migration on that host took 83 s instead of 4. A control
    behind another of the same job waits tunables.control_lock_wait, then is refused."""
    job_id = migrating(store, "default")
    push_tune(store.r, job_id, REQUEST, tune_request(bandwidth_mib=7), ttl_s=60)
    with job_lock_held(job_id):  # a first control libvirt has not answered
        for move in (
            lambda: control.tune(rt, store.get(job_id), REQUEST),
            lambda: control.force_complete(rt, store.get(job_id)),
            lambda: control.start_postcopy(rt, store.get(job_id)),
        ):
            started = time.monotonic()
            with pytest.raises(PhaseFailed, match=r"another change to job .* still before libvirt"):
                move()
            assert time.monotonic() - started < GATE_S
    assert guest.set == []  # nothing of the refused ones reached libvirt


def test_the_operators_switch_is_answered_once_libvirt_took_it(
    rt: Runtime, store: JobStore, guest: Recorded
) -> None:
    """`drover postcopy` waits for this step (a probe: it said "requested" whatever the
    worker did); a switch libvirt refuses is not answered as made."""
    job_id = migrating(store, "default")
    with capture_logs() as logs:
        control.start_postcopy(rt, store.get(job_id))
    steps = [e for e in logs if e["event"] == "policy.step"]
    assert [(s["action"], s["by"], s["reason"]) for s in steps] == [
        ("postcopy", "operator", "drover postcopy")
    ]
    assert guest.set == [("postcopy", 0, 0)]
    other = migrating(store, "default")
    guest.refuse_switch = True
    with capture_logs() as logs, pytest.raises(PhaseFailed):
        control.start_postcopy(rt, store.get(other))
    assert not [e for e in logs if e["event"] == "policy.step"]
