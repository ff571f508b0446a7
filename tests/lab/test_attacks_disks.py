"""Redis is not a root shell, for the disks a --copy-storage job makes: tried on the lab.

The attacker holds the Redis password (a producer's account) and a producer's signed
rollback (what `drover abort` sends); no trusted signing key of their own. After a guest
has moved with its disk, no rewrite of its job record makes the destination remove the image
the guest runs on: the destination goes by its own ledger and by libvirt.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from jobs.abort import rollback_sender
from jobs.keys import job_key
from jobs.model import Job
from tests.support.disk_guest import IMAGES, disk_guest, host_images
from tests.support.forgery import log_events
from tests.support.lab_fixtures import Lab, wait_for

pytestmark = pytest.mark.lab

GUEST = "disk-7"
FORGED_UUID = "00000000-1111-2222-3333-444444444444"
LOG_S = 30.0


@pytest.fixture
def moved_with_its_disk(lab: Lab) -> Iterator[Job]:
    """disk-7 moved from lab1 to lab2 with --copy-storage all: it runs on lab2, on the
    image lab2's prepare made."""
    with disk_guest(lab, GUEST):
        job = lab.migrate(GUEST, "lab1", "lab2", copy_storage="all")
        assert job.state.value == "succeeded", job.reason
        assert lab.running_on(GUEST) == ["lab2"]
        yield job


def test_a_rollback_sent_for_a_moved_guest_made_to_look_failed_keeps_its_disk(
    lab: Lab, moved_with_its_disk: Job
) -> None:
    """The job rewritten as failed with another uuid, then a producer's signed rollback:
    lab2 used to look for the guest by the record's uuid, find nothing, and delete the
    image under the running guest (it kept the job's images in its ledger for ever)."""
    job = moved_with_its_disk
    image = host_images(lab, "lab2") / f"{GUEST}.qcow2"
    assert image.exists()
    facts = json.loads(str(lab.drover.store.r.hget(job_key(job.id), "facts")))
    lab.drover.store.r.hset(
        job_key(job.id),
        mapping={"state": "failed", "facts": json.dumps(facts | {"uuid": FORGED_UUID})},
    )
    rollback_sender(lab.drover._app, lab.drover.send)(lab.drover.job(job.id))  # drover abort's
    wait_for(
        lambda: any(e["event"] == "rollback.done" for e in log_events("lab2", job.id)),
        LOG_S,
        "lab2's rollback",
    )
    assert image.exists(), f"{IMAGES}/{GUEST}.qcow2 was removed under the running guest"
    assert not any(e["event"] == "rollback.removed_images" for e in log_events("lab2", job.id))
    assert lab.running_on(GUEST) == ["lab2"]
