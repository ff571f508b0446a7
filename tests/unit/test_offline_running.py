"""An offline move of a guest that runs: a copy of its definition where asked for by hand,
refused where it would leave one guest defined on two hosts against what was asked."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from jobs.model import Job
from jobs.spec import MigrationSpec
from jobs.states import JobState
from worker.phase_source import offline_of_running

NOW = datetime(2026, 12, 5, tzinfo=UTC)


def job(parent: str | None = None, **spec: object) -> Job:
    s = MigrationSpec(domain="web", src="kvm1", dst="kvm2", **spec)  # type: ignore[arg-type]
    return Job(
        id="0123456789ab", spec=s, state=JobState.PREFLIGHT, created=NOW, updated=NOW, parent=parent
    )


OFFLINE = {"offline": True, "live": False, "persistent": True}


@pytest.mark.parametrize(
    ("the_job", "active", "refused"),
    [
        (job(**OFFLINE), True, None),  # the copy libvirt's guide describes, asked for
        (job(**OFFLINE), False, None),
        (job(**OFFLINE, undefine_source=True), False, None),  # shut off: moved
        (job(**OFFLINE, undefine_source=True), True, "defined on both hosts"),
        (job("0a0a0a0a0a0a", **OFFLINE, undefine_source=True), True, "evacuation planned it"),
        (job("0a0a0a0a0a0a", **OFFLINE, undefine_source=True), False, None),
        (job(live=True), True, None),  # not offline: nothing to say
    ],
)
def test_offline_of_a_running_guest(the_job: Job, active: bool, refused: str | None) -> None:
    reason = offline_of_running(the_job, active)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason and "\n" not in reason
        assert "nothing moved" in reason or "shut it down first" in reason
