"""What an evacuation says it did: its abort counts each child once (probe: a child finishing
on its destination was counted among those that "had ended"), and its outcome table says a
guest moved shut off is defined there, not running. Real test Redis."""

from __future__ import annotations

import pytest

from jobs.abort import TooLate, abort_job
from jobs.evacuations import abort_line
from jobs.keys import job_key
from jobs.states import JobState
from jobs.store import JobStore
from tests.unit.test_forged_admission import submit


@pytest.mark.parametrize(
    ("state", "ended"),
    [(JobState.FINISHING, False), (JobState.SUCCEEDED, True), (JobState.FAILED, True)],
)
def test_too_late_says_whether_the_job_had_ended(
    store: JobStore, state: JobState, ended: bool
) -> None:
    job_id = submit(store, f"web-{state.value}")
    store.r.hset(job_key(job_id), "state", state.value)
    with pytest.raises(TooLate) as raised:
        abort_job(store, job_id, by="ops@site", rollback=lambda _j: None)
    assert raised.value.ended is ended


def test_the_abort_line_counts_each_child_once() -> None:
    line = abort_line("0123456789ab", children=5, stopped=2, landing=1)
    assert line == (
        "evacuation 0123456789ab: abort requested; 2 of 5 child jobs stopped or being "
        "aborted, 1 too far along to stop (finishing or in post-copy: they complete on their "
        "destination), 2 had ended"
    )
    assert "too far" not in abort_line("0123456789ab", children=3, stopped=3, landing=0)
    assert abort_line("0123456789ab", 3, 3, 0).endswith(
        "3 of 3 child jobs stopped or being aborted, 0 had ended"
    )


def test_the_outcome_table_says_a_guest_moved_shut_off_is_defined_there_not_running() -> None:
    from jobs.evacuation_model import DomainOutcome
    from producer.render import destination_cell

    def outcome(**kw: object) -> DomainOutcome:
        return DomainOutcome(domain="web", job_id=None, job_state=None, on_source=False, **kw)  # type: ignore[arg-type]

    assert destination_cell(outcome(running_on="kvm2", destination_state="shutoff")) == (
        "kvm2 (shutoff)"
    )
    assert destination_cell(outcome(running_on="kvm2", destination_state="running")) == (
        "kvm2 (running)"
    )
    assert destination_cell(outcome(running_on="kvm2")) == "kvm2"  # recorded before the state
    assert destination_cell(outcome(running_on=None, destination_unreachable="refused")) == (
        "unknown: not reachable"
    )
    assert destination_cell(outcome(running_on=None)) == "-"
