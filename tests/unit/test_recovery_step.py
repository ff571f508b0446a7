"""Which interrupted step recovery may take over, judged from the job's record in Redis."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest

from jobs.phases import Phase
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from worker import recovery
from worker.recovery import _recover_in_background, _still_interrupted, current_step
from worker.runtime import Runtime


def started_job(store: JobStore) -> str:
    spec = MigrationSpec.model_validate({"domain": "web01", "src": "kvm1", "dst": "kvm2"})
    job_id = store.create(spec, host="cli")
    store.phase_started(job_id, Phase.SOURCE_PREFLIGHT.value, "kvm1")
    store.phase_ended(job_id, Phase.SOURCE_PREFLIGHT.value)
    store.phase_started(job_id, Phase.DESTINATION_PREPARE.value, "kvm2")
    return job_id


def test_a_phase_that_ended_after_the_sweep_read_the_job_is_not_run_again(
    store: JobStore,
) -> None:
    rt = cast(Runtime, SimpleNamespace(store=store))
    job_id = started_job(store)
    seen = store.get(job_id)  # the sweep's copy: prepare started, not ended
    step = current_step(seen)
    assert step is not None and step.phase is Phase.DESTINATION_PREPARE and step.started
    assert _still_interrupted(rt, job_id, Phase.DESTINATION_PREPARE) is not None

    store.phase_ended(job_id, Phase.DESTINATION_PREPARE.value)  # it finished normally
    assert _still_interrupted(rt, job_id, Phase.DESTINATION_PREPARE) is None


def test_an_ended_job_is_never_recovered(store: JobStore) -> None:
    rt = cast(Runtime, SimpleNamespace(store=store))
    job_id = started_job(store)
    store.transition(job_id, JobState.CANCELLED, host="cli", reason="aborted")
    assert _still_interrupted(rt, job_id, Phase.DESTINATION_PREPARE) is None
    assert _still_interrupted(rt, "000000000000", Phase.DESTINATION_PREPARE) is None


class InlineThread:
    """Runs its target when started, so a test sees at once whether recovery began."""

    def __init__(self, target: Any, **_: Any) -> None:
        self.target = target

    def start(self) -> None:
        self.target()


def test_the_sweep_takes_over_only_a_phase_still_interrupted(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    recovered: list[Phase] = []
    monkeypatch.setattr(recovery, "_recover", lambda rt, job, phase: recovered.append(phase))
    monkeypatch.setattr(threading, "Thread", InlineThread)  # for this test only
    rt = Runtime(host="kvm1", store=store, libvirt=cast(Any, None), ledger=cast(Any, None))
    job_id = started_job(store)
    stale = store.get(job_id)  # read by the sweep while prepare was still running

    store.phase_ended(job_id, Phase.DESTINATION_PREPARE.value)  # then it finished normally
    _recover_in_background(rt, stale, Phase.DESTINATION_PREPARE)
    assert recovered == [] and rt.running == set()

    store.phase_started(job_id, Phase.PERFORM.value, "kvm1")  # a step lost mid-way
    _recover_in_background(rt, store.get(job_id), Phase.PERFORM)
    assert recovered == [Phase.PERFORM] and rt.running == set()
