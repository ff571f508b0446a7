"""A failed migration call is libvirt's verdict only once libvirt shows no migration job on
the guest (worker/migration_carried_on.py); the frozen-worker case itself runs on the lab
(tests/faults/test_frozen_worker.py)."""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from tests.support.libvirt_errors import libvirt_error
from worker import migration_carried_on
from worker.libvirt_states import StateReason
from worker.migration_carried_on import landed_anyway, still_migrating
from worker.migration_watch import carry_out
from worker.postcopy_whereabouts import Whereabouts
from worker.steering import Action

RUNNING_JOB = {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "data_remaining": 1}
NO_JOB = {"type": libvirt.VIR_DOMAIN_JOB_NONE}


class Dom:
    """A domain whose jobStats answers `stats`, or raises it."""

    def __init__(
        self,
        stats: dict[str, Any] | Exception,
        shown: tuple[int, int] = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED),
    ) -> None:
        self.stats = stats
        self.shown = shown

    def state(self) -> list[int]:
        return list(self.shown)

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
    id = "j-1"

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


def test_a_post_copy_is_left_to_the_post_copy_recovery(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed post-copy stays listed as a job in libvirt: followed until idle, it was
    never resumed (the fault suite's link cut); running or failed, a post-copy is the
    post-copy recovery's, which resumes it or sees it land."""
    for reason in (libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY):
        dom = Dom(RUNNING_JOB, (libvirt.VIR_DOMAIN_PAUSED, reason))
        assert still_migrating(looked_up(monkeypatch, dom), Job()) is None  # type: ignore[arg-type]


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


RUNNING = StateReason(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED)
LEFT = StateReason(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED)
HUNG = StateReason(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED)
STILL = StateReason(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED)


class Store:
    def __init__(self, postcopy_since: str | None) -> None:
        self.postcopy_since = postcopy_since

    def get(self, job_id: str) -> Any:
        return self


def shown(
    monkeypatch: pytest.MonkeyPatch,
    source: StateReason | None,
    destination: StateReason | None,
    reachable: bool = True,
    postcopy_since: str | None = None,
) -> Runtime:
    """A runtime whose libvirt shows the guest so on both hosts (`locate`)."""
    seen = Whereabouts("web01", "kvm1", "kvm2", source, destination, reachable)
    monkeypatch.setattr(migration_carried_on, "locate", lambda _rt, _job, _within: seen)
    rt = Runtime()
    rt.store = Store(postcopy_since)  # type: ignore[attr-defined]
    return rt


def test_a_guest_that_left_and_runs_on_the_destination_landed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frozen past the keepalive, the worker missed the end of a migration libvirt completed:
    the guest shut off (or gone) here and running there is a landing, not a failure."""
    for source in (None, LEFT):
        assert landed_anyway(shown(monkeypatch, source, RUNNING), Job()) is not None  # type: ignore[arg-type]
    silent = landed_anyway(shown(monkeypatch, LEFT, None, reachable=False), Job())  # type: ignore[arg-type]
    assert silent is not None and "finish looks at kvm2 itself" in silent


def test_a_guest_still_here_hung_or_not_there_did_not_land(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert landed_anyway(shown(monkeypatch, STILL, RUNNING), Job()) is None  # type: ignore[arg-type]
    assert landed_anyway(shown(monkeypatch, None, None), Job()) is None  # type: ignore[arg-type]
    assert landed_anyway(shown(monkeypatch, LEFT, LEFT), Job()) is None  # type: ignore[arg-type]
    # The source's copy destroyed in post-copy, lab2's hung: the post-copy recovery's (lost).
    assert landed_anyway(shown(monkeypatch, None, HUNG), Job()) is None  # type: ignore[arg-type]
    silent = shown(monkeypatch, None, None, reachable=False, postcopy_since="2026-12-04T10:00")
    assert landed_anyway(silent, Job()) is None  # type: ignore[arg-type]


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


@pytest.mark.parametrize(
    "error",
    [
        "Requested operation is not valid: another migration job is already running for "
        "domain 'web'",
        "Timed out during operation: cannot acquire state change lock (held by "
        "monitor=remoteDispatchDomainMigratePerform3Params)",
    ],
)
def test_a_call_that_never_started_a_migration_follows_none(
    monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """The migration libvirt shows then is another job's (probe: a second job followed the
    first one's as its own, and its completion timeout aborted it): nothing is followed,
    nor asked of the destination; the call's error stands."""

    def never(*_: Any) -> Any:
        raise AssertionError("another job's migration was looked at")

    monkeypatch.setattr(migration_carried_on, "still_migrating", never)
    monkeypatch.setattr(migration_carried_on, "landed_anyway", never)
    look = migration_carried_on.second_look(None, None, None, error)  # type: ignore[arg-type]
    assert (look.landed, look.seen) == (False, None)
