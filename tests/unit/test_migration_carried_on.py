"""A failed migration call is libvirt's verdict only once libvirt shows no migration job on
the guest (worker/migration_carried_on.py); the frozen-worker case itself runs on the lab
(tests/faults/test_frozen_worker.py)."""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from tests.support.libvirt_errors import libvirt_error
from worker import migration_carried_on
from worker.migration_carried_on import still_migrating

RUNNING_JOB = {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "data_remaining": 1}
NO_JOB = {"type": libvirt.VIR_DOMAIN_JOB_NONE}


class Dom:
    """A domain whose jobStats answers `stats`, or raises it."""

    def __init__(self, stats: dict[str, Any] | Exception) -> None:
        self.stats = stats

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


class Seam:
    resets = 0

    def reset(self) -> None:
        self.resets += 1


class Runtime:
    def __init__(self) -> None:
        self.libvirt = Seam()


class Job:
    class spec:
        domain = "web01"


def looked_up(monkeypatch: pytest.MonkeyPatch, *answers: Any) -> Runtime:
    """A runtime whose lookups of the guest give `answers` in turn (an exception raised)."""
    queue = list(answers)

    def job_domain(_rt: Any, _job: Any, _name: str) -> Any:
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(migration_carried_on, "job_domain", job_domain)
    return Runtime()


def test_a_job_libvirt_still_runs_is_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    dom = Dom(RUNNING_JOB)
    assert still_migrating(looked_up(monkeypatch, dom), Job()) is dom  # type: ignore[arg-type]


def test_no_job_leaves_the_call_s_error_standing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert still_migrating(looked_up(monkeypatch, Dom(NO_JOB)), Job()) is None  # type: ignore[arg-type]
    assert still_migrating(looked_up(monkeypatch, None), Job()) is None  # type: ignore[arg-type]
    # Any refusal but a busy job lock says there is no migration to follow.
    gone = libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running")
    assert still_migrating(looked_up(monkeypatch, Dom(gone)), Job()) is None  # type: ignore[arg-type]


def test_a_busy_job_lock_is_a_migration_still_running(monkeypatch: pytest.MonkeyPatch) -> None:
    busy = libvirt_error(libvirt.VIR_ERR_OPERATION_TIMEOUT, "cannot acquire state change lock")
    dom = Dom(busy)
    assert still_migrating(looked_up(monkeypatch, dom), Job()) is dom  # type: ignore[arg-type]


def test_a_dead_connection_is_opened_again_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection the call used was closed by libvirtd (the keepalive): the first lookup
    on it fails, the second, on a new one, finds the migration libvirt carries on."""
    hangup = libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "client socket is closed")
    dom = Dom(RUNNING_JOB)
    rt = looked_up(monkeypatch, hangup, dom)
    assert still_migrating(rt, Job()) is dom  # type: ignore[arg-type]
    assert rt.libvirt.resets == 1
    rt = looked_up(monkeypatch, hangup, hangup)
    assert still_migrating(rt, Job()) is None  # type: ignore[arg-type]
