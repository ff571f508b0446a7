"""A guest paused before its migration switched to post-copy was down from that pause.

Probe F4: libvirt reports a post-copy's downtime from the switch only (6 ms), though the guest
had been paused about 4 s before it (force-complete where post-copy was not yet allowed,
the policy's suspend step, or by hand). The moments come from libvirt's lifecycle events
(worker/libvirt_events.py) and are added to libvirt's figure (worker/completion.py).
"""

from __future__ import annotations

import libvirt
import pytest

from jobs.spec import MigrationSpec
from jobs.store import JobStore
from producer.render import downtime_cell, event_line
from worker import switch_asked
from worker.completion import Landing, with_pause_before_switch
from worker.libvirt_events import CompletionWatch

SUSPENDED = libvirt.VIR_DOMAIN_EVENT_SUSPENDED
PAUSED = libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED
# A pause asked while the guest migrates out comes as MIGRATED (seen on the lab).
MIGRATED = libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED
POSTCOPY = libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY
RESUMED = libvirt.VIR_DOMAIN_EVENT_RESUMED
ASKED = 13.0  # when drover asked for the switch, by the worker's monotonic clock


class _Dom:
    def connect(self) -> object:
        return object()


def watch_told(*events: tuple[float, int, int]) -> CompletionWatch:
    """A watch (no event loop: nothing registered) told `events` (at, event, detail)."""
    now = [0.0]
    watch = CompletionWatch(_Dom(), clock=lambda: now[0])
    for at, event, detail in events:
        now[0] = at
        watch._on_lifecycle(None, None, event, detail, None)
    return watch


@pytest.mark.parametrize("detail", [MIGRATED, PAUSED])
def test_the_pause_before_the_switch_is_measured_from_libvirts_events(detail: int) -> None:
    watch = watch_told((10.0, SUSPENDED, detail), (13.1, SUSPENDED, POSTCOPY))
    assert watch.postcopy and watch.paused_before_switch_ms(ASKED) == 3100


def test_the_switchs_own_stop_is_no_pause_before_it() -> None:
    """Probe: libvirt announces the stop of an ordinary switch as a pause by the migration,
    7 to 25 ms before post-copy, longer than its own downtime (2 to 5 ms): nine of sixteen
    plain switches were reported "paused before the switch". It comes after the switch was
    asked; a switch whose moment this process does not know counts no pause."""
    own_stop = watch_told((13.02, SUSPENDED, MIGRATED), (13.045, SUSPENDED, POSTCOPY))
    assert own_stop.paused_before_switch_ms(ASKED) is None
    paused = watch_told((10.0, SUSPENDED, MIGRATED), (13.1, SUSPENDED, POSTCOPY))
    assert paused.paused_before_switch_ms(None) is None


@pytest.mark.parametrize(
    "events",
    [
        [(13.1, SUSPENDED, POSTCOPY)],  # never paused before: libvirt's figure is the whole
        [(10.0, SUSPENDED, PAUSED)],  # paused, never switched: pre-copy counts it itself
        [(10.0, SUSPENDED, PAUSED), (11.0, RESUMED, 0), (13.1, SUSPENDED, POSTCOPY)],
        [(13.1, SUSPENDED, POSTCOPY), (14.0, SUSPENDED, PAUSED)],  # after the switch
    ],
    ids=["no-pause", "no-switch", "resumed-before", "paused-after"],
)
def test_no_pause_is_counted_that_did_not_last_until_the_switch(
    events: list[tuple[float, int, int]],
) -> None:
    assert watch_told(*events).paused_before_switch_ms(ASKED) is None


def test_the_first_pause_counts_when_paused_twice() -> None:
    watch = watch_told(
        (10.0, SUSPENDED, PAUSED),
        (11.0, SUSPENDED, PAUSED),
        (12.0, SUSPENDED, POSTCOPY),
        (12.5, SUSPENDED, POSTCOPY),
    )
    assert watch.paused_before_switch_ms(11.9) == 2000


def test_the_pause_is_added_to_libvirts_postcopy_downtime_only() -> None:
    postcopy = Landing(downtime_ms=6, mode="postcopy")
    counted = with_pause_before_switch(postcopy, 4000)
    assert counted.downtime_ms == 4006 and counted.paused_before_switch_ms == 4000
    assert counted.result_fields() == {
        "downtime_ms": 4006,
        "mode": "postcopy",
        "paused_before_switch_ms": 4000,
    }
    precopy = Landing(downtime_ms=27, mode="precopy")  # libvirt counts a pre-copy's pause
    assert with_pause_before_switch(precopy, 4000) == precopy
    unknown = Landing(mode="postcopy")  # libvirt gave no downtime: none is made up
    assert with_pause_before_switch(unknown, 4000) == unknown
    assert with_pause_before_switch(postcopy, None) == postcopy


def test_the_jobs_table_says_how_much_of_the_downtime_was_the_pause(store: JobStore) -> None:
    job_id = store.create(MigrationSpec(domain="idle-1", src="kvm1", dst="kvm2"), host="t")
    store.update(job_id, result={"downtime_ms": 6, "mode": "postcopy"})
    assert downtime_cell(store.get(job_id)) == "6 ms (postcopy)"
    store.update(job_id, result={"downtime_ms": 4006, "paused_before_switch_ms": 4000})
    shown = downtime_cell(store.get(job_id))
    assert shown == "4006 ms (postcopy, 4000 ms of it paused before the switch)"


def test_the_moment_a_switch_was_asked_is_taken_once_and_forgotten_when_refused() -> None:
    switch_asked.note("a")
    first = switch_asked.taken("a")
    assert first is not None and switch_asked.taken("a") is None
    switch_asked.note("b")
    switch_asked.note("b")  # asked again: the first ask is the moment
    switch_asked.forget("b")  # libvirt refused: nothing was switched
    assert switch_asked.taken("b") is None


def test_moments_of_switches_never_taken_do_not_pile_up() -> None:
    for n in range(switch_asked.MAX_REMEMBERED + 10):
        switch_asked.note(f"job-{n}")
    assert switch_asked.taken("job-0") is None  # the oldest went
    assert switch_asked.taken(f"job-{switch_asked.MAX_REMEMBERED + 9}") is not None


def test_drover_events_shows_the_downtime_of_a_completed_migration() -> None:
    """Probe: the human form of `drover events` gave migration_ms only."""
    line = event_line(
        {
            "event": "migration.completed",
            "migration_ms": 9120.4,
            "downtime_ms": 4654,
            "paused_before_switch_ms": 4652,
            "mode": "postcopy",
            "memory_iteration": 3,
        }
    )
    assert line.endswith(
        "migration_ms=9120.4 downtime_ms=4654 paused_before_switch_ms=4652 mode=postcopy"
    )
