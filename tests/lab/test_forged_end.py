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
