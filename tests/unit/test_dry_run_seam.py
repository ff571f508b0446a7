"""A dry run's phases against libvirt's `test:///default` driver and the real test Redis:
the checks run and are recorded, nothing is held, reserved or taken, and perform refuses a
dry run's spec whatever message reaches it (tests/unit/test_libvirt_seam.py has the seam)."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from jobs.dry_run import record_dry_run
from jobs.keys import GATES_FIELD, WAITING, job_key
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore, domain_lock_key
from tests.unit.test_libvirt_seam import GUEST, env, guest_uuid, hv, recorded, runtime
from worker.phase_destination import destination_prepare
from worker.phase_errors import PhaseFailed
from worker.phase_perform import perform
from worker.phase_source import source_preflight

__all__ = ["env", "hv"]  # fixtures, used by name


def dry_run(store: JobStore, **fields: object) -> str:
    spec = MigrationSpec.model_validate(
        {"domain": GUEST, "src": "kvm1", "dst": "kvm2", "dry_run": True, **fields}
    )
    return record_dry_run(store, spec, origin="test", signer=None)


def test_a_dry_run_is_admitted_without_a_slot_a_lane_or_a_lease(store: JobStore) -> None:
    job_id = dry_run(store)
    job = store.get(job_id)
    assert job.state is JobState.QUEUED and job.admitted is not None
    assert store.r.hget(job_key(job_id), GATES_FIELD) == ""
    assert store.r.zcard(WAITING) == 0
    assert store.r.get(domain_lock_key("name", GUEST)) is None


def test_the_source_records_its_refusals_and_holds_nothing(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    job_id = dry_run(store)
    assert source_preflight(runtime(store, "kvm1", tmp_path), store.get(job_id)) is None
    job = store.get(job_id)
    (safety,) = [c for c in job.result.source_checks if c.check == "disk_safety"]
    assert not safety.passed and safety.host == "kvm1"
    assert "unsafe to migrate: vda (/guest/diskimage1" in (safety.reason or "")
    assert store.r.get(domain_lock_key("uuid", guest_uuid(hv))) is None


def test_the_destination_fails_on_both_sides_refusals_and_takes_nothing(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    job_id = dry_run(store)
    rt = runtime(store, "kvm1", tmp_path)
    source_preflight(rt, store.get(job_id))
    store.update(job_id, facts=recorded(guest_uuid(hv)))
    dest = runtime(store, "kvm2", tmp_path)
    with pytest.raises(PhaseFailed) as refused:
        destination_prepare(dest, store.get(job_id))
    assert "unsafe to migrate" in refused.value.reason  # the source's verdict
    assert "is already running on kvm2" in refused.value.reason  # the destination's
    assert store.reserved_mib("kvm2") == 0
    assert dest.ledger.incoming_job(guest_uuid(hv)) is None
    checks = {c.check for c in store.get(job_id).result.destination_checks}
    assert {"cpu", "hugepages", "shared_disks", "definition", "memory"} <= checks


def test_perform_refuses_a_dry_run_whatever_message_reaches_it(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    job_id = dry_run(store)
    store.update(job_id, facts=recorded(guest_uuid(hv)))
    with pytest.raises(PhaseFailed, match="a dry run never migrates"):
        perform(runtime(store, "kvm1", tmp_path), store.get(job_id))
    assert store.get(job_id).state is JobState.QUEUED  # never advanced to migrating
    assert hv.lookupByName(GUEST).isActive()
