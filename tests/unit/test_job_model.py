"""The job model against a real Redis: spec validation, compare-and-set transitions, events."""

from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError

from jobs.spec import MigrationSpec, TimeoutAction, first_error
from jobs.states import TERMINAL, JobState, allowed_sources
from jobs.store import JobNotFound, JobStore


def spec(**kw: object) -> MigrationSpec:
    return MigrationSpec.model_validate({"domain": "web01", "src": "kvm1", "dst": "kvm2", **kw})


def test_spec_defaults_are_live_native_p2p() -> None:
    s = spec()
    assert (s.live, s.control.value, s.transport.value) == (True, "p2p", "native")
    assert not s.persistent and not s.undefine_source


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dst": "kvm1"}, "same host"),
        ({"domain": "a/b"}, "invalid domain"),
        ({"domain": "x" * 201}, "invalid domain"),
        ({"domain": "bad\nname"}, "invalid domain"),
        ({"src": "-kvm"}, "invalid --from"),
        ({"bandwidth_mib": 0}, "--bandwidth"),
        ({"bogus": 1}, "bogus"),
        ({"live": False, "completion_timeout_s": 30}, "--completion-timeout needs --live"),
        ({"completion_timeout_s": 86_401}, "--completion-timeout"),
    ],
)
def test_bad_specs_are_refused_with_one_line(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        spec(**fields)
    line = first_error(exc.value)
    assert message in line
    assert "\n" not in line


def test_a_completion_timeout_suspends_unless_told_otherwise() -> None:
    assert spec().on_timeout is None
    assert spec(completion_timeout_s=30).on_timeout is TimeoutAction.SUSPEND
    chosen = spec(completion_timeout_s=30, timeout_action="postcopy", postcopy=True)
    assert chosen.on_timeout is TimeoutAction.POSTCOPY


def test_transitions_follow_the_state_machine() -> None:
    assert allowed_sources(JobState.PREFLIGHT) == {JobState.QUEUED, JobState.STALLED}
    assert allowed_sources(JobState.SUCCEEDED) == {JobState.FINISHING, JobState.STALLED}
    assert JobState.STALLED not in allowed_sources(JobState.STALLED)
    assert TERMINAL.isdisjoint(allowed_sources(JobState.FAILED))


def test_job_walks_forward_and_records_history(store: JobStore) -> None:
    job_id = store.create(spec(), host="test")
    for target in (
        JobState.PREFLIGHT,
        JobState.PREPARED,
        JobState.MIGRATING,
        JobState.FINISHING,
        JobState.SUCCEEDED,
    ):
        moved, _ = store.transition(job_id, target, host="kvm1")
        assert moved
    job = store.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.terminal
    assert [t.state for t in job.transitions] == [
        JobState.QUEUED,
        JobState.PREFLIGHT,
        JobState.PREPARED,
        JobState.MIGRATING,
        JobState.FINISHING,
        JobState.SUCCEEDED,
    ]
    assert all(t.at <= u.at for t, u in zip(job.transitions, job.transitions[1:], strict=False))


def test_skipping_a_state_or_leaving_a_terminal_one_is_refused(store: JobStore) -> None:
    job_id = store.create(spec(), host="test")
    assert store.transition(job_id, JobState.MIGRATING, host="kvm1") == (False, JobState.QUEUED)
    assert store.transition(job_id, JobState.FAILED, host="kvm1", reason="boom")[0]
    assert store.transition(job_id, JobState.PREFLIGHT, host="kvm1") == (False, JobState.FAILED)
    assert store.transition(job_id, JobState.CANCELLED, host="kvm1")[0] is False
    job = store.get(job_id)
    assert job.state is JobState.FAILED and job.reason == "boom"


def test_concurrent_transitions_let_exactly_one_win(store: JobStore) -> None:
    job_id = store.create(spec(), host="test")
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait()
        wins.append(store.transition(job_id, JobState.PREFLIGHT, host="kvm1")[0])

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    assert len(store.get(job_id).transitions) == 2


def test_events_are_kept_in_order_and_followed_to_the_end(store: JobStore) -> None:
    job_id = store.create(spec(), host="test")
    for i in range(3):
        store.append_event(job_id, {"event": "tick", "i": i})
    store.transition(job_id, JobState.FAILED, host="kvm1", reason="stop")
    store.append_event(job_id, {"event": "job.state", "state": "failed"})
    seen = [e.get("i", e["event"]) for e in store.follow_events(job_id, block_ms=50)]
    assert seen == [0, 1, 2, "job.state"]


def test_reservations_are_counted_per_host(store: JobStore) -> None:
    a = store.create(spec(), host="cli")
    b = store.create(spec(domain="web02"), host="cli")
    assert store.reserve("kvm2", a, 64) and store.reserve("kvm2", b, 128)
    assert store.reserved_mib("kvm2") == 192
    assert store.reserved_mib("kvm2", excluding=a) == 128
    store.release("kvm2", a)
    assert store.reserved_mib("kvm2") == 128


@pytest.mark.parametrize("ended", [s for s in JobState if s in TERMINAL])
def test_an_ended_job_books_no_memory(store: JobStore, ended: JobState) -> None:
    """A phase that books memory after its job ended (a late or repeated step) books nothing:
    the terminal transition already freed what the job held, and nothing would free it again."""
    job_id = store.create(spec(), host="cli")
    store.r.hset(f"drover:job:{job_id}", "state", ended.value)
    assert not store.reserve("kvm2", job_id, 64)
    assert not store.reserve("kvm2", "000000000000", 64)  # no such job
    assert store.reserved_mib("kvm2") == 0


def test_unknown_job_is_reported(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.get("000000000000")
