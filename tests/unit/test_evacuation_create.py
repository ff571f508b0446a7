"""One active evacuation per host: the check and the creation are one step (jobs/evacuation.py).

Against the real test Redis: a second evacuation of a host is refused with the words
`drover evacuate` prints, a dry run runs beside anything, and two creations racing for the
same host never both pass.
"""

from __future__ import annotations

import threading

import pytest

from jobs.evacuation import EvacuationBusy, EvacuationSpec, EvacuationState, EvacuationStore
from jobs.store import JobStore

RACES = 20
RACERS = 4


def test_a_second_evacuation_of_a_host_is_refused(store: JobStore) -> None:
    evacuations = EvacuationStore(store)
    first = evacuations.create(EvacuationSpec(host="kvm1"), "test")
    with pytest.raises(EvacuationBusy) as refused:
        evacuations.create(EvacuationSpec(host="kvm1", to=["kvm2"]), "test")
    assert str(refused.value) == f"kvm1 already has an active evacuation {first} (queued)"
    assert evacuations.active_ids() == [first]


def test_a_dry_run_and_another_host_are_not_held_back(store: JobStore) -> None:
    evacuations = EvacuationStore(store)
    first = evacuations.create(EvacuationSpec(host="kvm1"), "test")
    dry = evacuations.create(EvacuationSpec(host="kvm1", dry_run=True), "test")
    other = evacuations.create(EvacuationSpec(host="kvm2"), "test")
    assert evacuations.active_ids() == sorted([first, dry, other])
    # An active dry run does not hold its host either.
    evacuations.transition(first, EvacuationState.FAILED, "test")
    again = evacuations.create(EvacuationSpec(host="kvm1"), "test")
    assert evacuations.get(again).state is EvacuationState.QUEUED


def _race(evacuations: EvacuationStore) -> tuple[list[str], list[str]]:
    """RACERS threads create an evacuation of kvm1 at once: (created ids, refusals)."""
    start = threading.Barrier(RACERS)
    created: list[str] = []
    refused: list[str] = []

    def race() -> None:
        start.wait()
        try:
            created.append(evacuations.create(EvacuationSpec(host="kvm1"), "test"))
        except EvacuationBusy as exc:
            refused.append(str(exc))

    racers = [threading.Thread(target=race) for _ in range(RACERS)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    return created, refused


def test_racing_creations_leave_one_active_evacuation(store: JobStore) -> None:
    evacuations = EvacuationStore(store)
    for _ in range(RACES):
        store.r.flushdb()
        created, refused = _race(evacuations)
        assert len(created) == 1 and len(refused) == RACERS - 1
        assert evacuations.active_ids() == created
