"""A job's record written ended for a moment, mid-migration, with the producer's Redis password.

The probe: `HSET drover:job:J state succeeded` for two seconds while J's guest was on its way
to lab2, then its real state back. An admission in those seconds pruned J's slots as an ended
job's; J's finish was then refused for ever ("admission never started it"), and J stayed
`migrating` while libvirt showed its guest running on lab2 only; the guest could not be
moved again nor the job aborted. Now J ends as libvirt shows it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jobs.keys import job_key
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for

pytestmark = pytest.mark.lab

GUEST, OTHER = "idle-1", "idle-2"
SLOW_MIB = 8  # idle-1's 64 MiB take seconds: time to write the record mid-migration


@pytest.fixture
def both_home(lab: Lab) -> Iterator[None]:
    lab.home(GUEST)
    lab.home(OTHER)
    yield
    lab.home(GUEST)
    lab.home(OTHER)


def test_a_job_written_ended_for_a_moment_mid_migration_ends_as_libvirt_shows(
    lab: Lab, both_home: None
) -> None:
    d = lab.drover
    job_id = d.submit(domain=GUEST, src="lab1", dst="lab2", live=True, bandwidth_mib=SLOW_MIB)
    wait_for(lambda: lab.view("lab2", GUEST).exists, JOB_TIMEOUT_S, "the incoming copy on lab2")
    real = d.store.r.hget(job_key(job_id), "state")
    assert real == "migrating"
    d.store.r.hset(job_key(job_id), "state", "succeeded")  # the forger's moment
    try:
        other = d.submit(domain=OTHER, src="lab1", dst="lab2")  # admitted in that moment
    finally:
        d.store.r.hset(job_key(job_id), "state", real)
    job = d.wait(job_id, JOB_TIMEOUT_S)
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on(GUEST) == ["lab2"]
    assert any(e["event"] == "job.slots_lost" for e in d.events(job_id))
    second = d.wait(other, JOB_TIMEOUT_S)
    assert second.state.value == "succeeded", second.reason
    assert lab.running_on(OTHER) == ["lab2"]


@pytest.mark.parametrize("forged", ["cancelled", "failed"])
def test_a_job_written_ended_for_good_mid_migration_ends_as_libvirt_shows(
    lab: Lab, both_home: None, forged: str
) -> None:
    """The record written `cancelled` (or `failed`) mid-migration, and left so: libvirt goes
    on and the guest lands on lab2. lab2's worker, which prepared the job and runs the guest
    it brought in, takes the job back up (`job.reopened`); finish and confirm then check it
    as always, and the job ends succeeded (before: it stayed `cancelled`, its finish and
    confirm never ran, while libvirt showed the guest on lab2 only)."""
    d = lab.drover
    job_id = d.submit(domain=GUEST, src="lab1", dst="lab2", live=True, bandwidth_mib=SLOW_MIB)
    wait_for(lambda: lab.view("lab2", GUEST).exists, JOB_TIMEOUT_S, "the incoming copy on lab2")
    assert d.store.r.hget(job_key(job_id), "state") == "migrating"
    d.store.r.hset(job_key(job_id), "state", forged)  # the forger, for good

    def ended_as_libvirt_shows() -> bool:
        return d.job(job_id).state.value == "succeeded"

    wait_for(ended_as_libvirt_shows, JOB_TIMEOUT_S, f"{job_id} to end succeeded")
    assert lab.running_on(GUEST) == ["lab2"] and not lab.view("lab1", GUEST).active
    events = list(d.events(job_id))
    (reopened,) = [e for e in events if e["event"] == "job.reopened"]
    assert reopened["host"] == "lab2" and reopened["previous"] == forged
    assert f"the record said {forged}, but {GUEST} runs on lab2" in reopened["reason"]
    said = [e["event"] for e in events]
    assert "finish.verified" in said and said[-1] == "job.state"  # its end, last
    assert events[-1]["state"] == "succeeded"
    assert d.job(job_id).result.destination is not None  # finish's look at the arrival
