"""An evacuation whose list of children is deleted in Redis while they migrate (anyone with the
Redis password can): it ends only when they have, and says what libvirt shows. Before, it
ended `partial` within a second, saying every domain was never queued, and the children then
moved every guest anyway."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jobs.keys import children_key
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for

pytestmark = pytest.mark.lab


@pytest.fixture
def home(lab: Lab) -> Iterator[None]:
    """Every guest on lab1 and every host enabled, before and after the test."""
    lab.all_home()
    yield
    lab.all_home()


def test_children_deleted_from_the_list_are_waited_for_and_the_drain_is_true(
    lab: Lab, home: None
) -> None:
    d = lab.drover
    ev_id = d.evacuate(d.evacuation_spec(host="lab1", to=["lab2"], bandwidth_mib=2))

    def all_queued() -> bool:
        ev = d.evacuation(ev_id)
        placed = [p.domain for p in ev.plan or [] if p.destination is not None]
        return ev.state.value == "running" and sorted(ev.children) == sorted(placed)

    wait_for(all_queued, JOB_TIMEOUT_S, "every child queued")
    children = dict(d.evacuation(ev_id).children)
    assert children and any(not d.job(j).terminal for j in children.values())
    d.store.r.delete(children_key(ev_id))

    ev = d.wait_evacuation(ev_id, JOB_TIMEOUT_S)

    assert ev.state.value == "drained", ev.reason
    assert ev.children == children  # put back
    assert all(d.job(j).state.value == "succeeded" for j in children.values())
    for domain in children:
        assert lab.running_on(domain) == ["lab2"], domain
    refound = [e for e in d.events(ev_id) if e["event"] == "evacuation.child_refound"]
    assert sorted(e["domain"] for e in refound) == sorted(children)
