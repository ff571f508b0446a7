"""A failed migration call is libvirt's verdict only once libvirt shows no migration job on
the guest (worker/migration_carried_on.py); the frozen-worker case itself runs on the lab
(tests/faults/test_frozen_worker.py)."""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from tests.support.libvirt_errors import libvirt_error
from worker import migration_carried_on
from worker.libvirt_host import LibvirtUnavailable
from worker.migration_carried_on import landed_anyway, still_migrating
from worker.migration_watch import carry_out
from worker.steering import Action

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
        dst = "kvm2"


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


def test_a_dead_connection_is_asked_again_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection the call used was closed by libvirtd (the keepalive): the first lookup
    on it fails, the second (the runtime opens a new one) finds the migration libvirt
    carries on. The shared connection is never closed by this check."""
    hangup = libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "client socket is closed")
    dom = Dom(RUNNING_JOB)
    rt = looked_up(monkeypatch, hangup, dom)
    assert still_migrating(rt, Job()) is dom  # type: ignore[arg-type]
    assert rt.libvirt.resets == 0
    rt = looked_up(monkeypatch, hangup, hangup)
    assert still_migrating(rt, Job()) is None  # type: ignore[arg-type]


class Active:
    def __init__(self, active: bool) -> None:
        self.active = active

    def isActive(self) -> bool:
        return self.active


class Peers(Seam):
    """The destination's libvirtd: runs the guest (True), has it inactive or not (False,
    None), or does not answer (an exception)."""

    def __init__(self, answer: bool | Exception | None) -> None:
        self.answer = answer

    def peer_facts(self, uri: str, uuid: str) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        return None if self.answer is None else Active(self.answer)


class Settings:
    class host_entry:
        peer_uri = "qemu+tcp://kvm2/system"

    def host(self, name: str) -> Any:
        return self.host_entry


def after_the_call(
    monkeypatch: pytest.MonkeyPatch, here: Any, there: bool | Exception | None
) -> Runtime:
    rt = looked_up(monkeypatch, here)
    rt.libvirt = Peers(there)
    rt.settings = Settings()  # type: ignore[attr-defined]
    monkeypatch.setattr(migration_carried_on, "guest_uuid", lambda _rt, _job: "u-1")
    rt.host = "kvm1"  # type: ignore[attr-defined]
    return rt


def test_a_guest_that_left_and_runs_on_the_destination_landed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frozen past the keepalive, the worker missed the end of a migration libvirt completed:
    the guest shut off (or gone) here and running there is a landing, not a failure."""
    for here in (None, Active(False)):
        shown = landed_anyway(after_the_call(monkeypatch, here, True), Job())  # type: ignore[arg-type]
        assert shown == "web01 is no longer active on kvm1 and runs on kvm2"
    silent = LibvirtUnavailable("cannot reach qemu+tcp://kvm2/system")
    shown = landed_anyway(after_the_call(monkeypatch, None, silent), Job())  # type: ignore[arg-type]
    assert shown is not None and "finish looks there" in shown


def test_a_guest_still_here_or_not_there_did_not_land(monkeypatch: pytest.MonkeyPatch) -> None:
    assert landed_anyway(after_the_call(monkeypatch, Active(True), True), Job()) is None  # type: ignore[arg-type]
    assert landed_anyway(after_the_call(monkeypatch, None, None), Job()) is None  # type: ignore[arg-type]
    assert landed_anyway(after_the_call(monkeypatch, None, False), Job()) is None  # type: ignore[arg-type]


class Aborted:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def abortJob(self) -> int:
        if self.error is not None:
            raise self.error
        return 0


def test_an_abort_libvirt_never_heard_is_not_a_refusal() -> None:
    """An abort sent over the connection libvirtd closed (the worker frozen past the
    keepalive) was taken for libvirt's refusal and withdrawn (fault probe); only an answer
    of libvirt's driver is a refusal."""
    action = Action("cancel", "aborted by operator")
    closed = libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "client socket is closed")
    assert carry_out(Aborted(closed), action) is None  # type: ignore[arg-type]
    refused = libvirt_error(
        libvirt.VIR_ERR_OPERATION_INVALID,
        "cannot abort migration in post-copy mode",
        libvirt.VIR_FROM_QEMU,
    )
    assert carry_out(Aborted(refused), action) is False  # type: ignore[arg-type]
    assert carry_out(Aborted(None), action) is True  # type: ignore[arg-type]
