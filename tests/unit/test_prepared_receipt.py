"""perform migrates only with the destination's signed word that it prepared this job for
this guest. Before: a job whose prepare message was taken off the destination's queue, its
prepare phase written ended and its state `prepared` by hand, was sent to perform by recovery,
and its guest landed on a host that had checked nothing (maintenance, room) and booked
nothing (attacker probe, lab 17). Real keys (RSA), the real test Redis."""

from __future__ import annotations

from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from jobs.keys import job_key
from jobs.prepared_receipt import PREPARED_FIELD, check_prepared, sign_prepared
from jobs.request_signing import REQUEST_FIELD, RequestRefused, signer_for, verifier_for
from jobs.spec import MigrationSpec
from jobs.store import JobStore
from jobs.submission import enqueue
from tests.unit.test_request_signing import Fleet, fleet, keys
from worker.phase_errors import PhaseFailed
from worker.phase_perform import prepared_or_fail
from worker.runtime import Runtime

__all__ = ["fleet", "keys"]  # fixtures, used by name
UUID = "e58ebdcd-e238-479f-bce2-9f5b8108f5d2"
OTHER_UUID = "e58ebdcd-e238-479f-bce2-000000000000"
NOW = datetime.now(UTC)


def job(fleet: Fleet, domain: str = "web01") -> str:
    spec = MigrationSpec(domain=domain, src="kvm1", dst="kvm2")
    return enqueue(fleet.store, spec, origin="t", signer=signer_for(fleet.settings.security))


def receipt(fleet: Fleet, job_id: str, host: str = "kvm2", uuid: str = UUID) -> str:
    signed = sign_prepared(signer_for(fleet.settings.security), job_id, host, uuid, NOW)
    assert signed is not None
    return signed


def check(fleet: Fleet, raw: str | None, job_id: str, host: str = "kvm2") -> None:
    check_prepared(verifier_for(fleet.settings.security), raw, job_id, host, UUID)


def test_the_destinations_receipt_lets_the_guest_it_names_go_there(fleet: Fleet) -> None:
    job_id = job(fleet)
    check(fleet, receipt(fleet, job_id), job_id)


def refused(fleet: Fleet, raw: str | None, job_id: str, host: str = "kvm2") -> str:
    with pytest.raises(RequestRefused) as caught:
        check(fleet, raw, job_id, host)
    return str(caught.value)


def test_a_job_without_a_receipt_is_not_migrated(fleet: Fleet) -> None:
    assert refused(fleet, None, job(fleet)) == (
        "kvm2 never said it prepared this job (no signed receipt)"
    )


def test_a_receipt_of_another_job_guest_or_host_is_no_receipt(fleet: Fleet) -> None:
    job_id, other = job(fleet), job(fleet, "web02")
    assert refused(fleet, receipt(fleet, other), job_id) == (
        f"the signed request is for job {other}, not {job_id}"
    )
    assert "not what was signed" in refused(fleet, receipt(fleet, job_id, uuid=OTHER_UUID), job_id)
    assert "not what was signed" in refused(fleet, receipt(fleet, job_id, host="kvm1"), job_id)


def test_the_jobs_own_request_copied_is_no_receipt(fleet: Fleet) -> None:
    job_id = job(fleet)
    request = fleet.store.r.hget(job_key(job_id), REQUEST_FIELD)
    assert "not a prepared" in refused(fleet, cast(str, request), job_id)


def test_a_receipt_a_stranger_signed_is_no_receipt(fleet: Fleet) -> None:
    job_id = job(fleet)
    forged = sign_prepared(fleet.stranger, job_id, "kvm2", UUID, NOW)
    assert "does not trust" in refused(fleet, forged, job_id)


def said(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_perform_fails_the_job_said_so_without_the_destinations_receipt(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's job: written `prepared`, no receipt. perform refuses, saying why
    (`security.rejected`), before anything moved; with the receipt it goes on."""
    job_id = job(fleet)
    rt = cast(Runtime, SimpleNamespace(store=fleet.store, settings=fleet.settings))
    spec_job = fleet.store.get(job_id)
    with capture_logs() as logs, pytest.raises(PhaseFailed) as caught:
        prepared_or_fail(rt, spec_job, UUID)
    assert str(caught.value).endswith(
        ": kvm2 never said it prepared this job (no signed receipt); nothing moved"
    )
    (rejected,) = said(logs, "security.rejected")
    assert "kvm2 never said it prepared this job" in rejected["reason"]
    fleet.store.r.hset(job_key(job_id), PREPARED_FIELD, receipt(fleet, job_id))
    signed_job = fleet.store.get(job_id)  # the record as the phase frame loads it
    prepared_or_fail(rt, signed_job, UUID)  # the destination's word: it goes on
    with pytest.raises(PhaseFailed, match="not what was signed"):
        prepared_or_fail(rt, signed_job, OTHER_UUID)  # another guest than the one it prepared


def test_nothing_is_signed_or_checked_with_signing_off(store: JobStore) -> None:
    assert sign_prepared(None, "j", "kvm2", UUID, NOW) is None
    check_prepared(None, None, "j", "kvm2", UUID)
