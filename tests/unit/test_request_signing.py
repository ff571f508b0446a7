"""Signed requests against a real Redis: what a producer signs, a worker's check refuses when
anything in the record changed, and admission never starts a job no trusted key signed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from config.settings import Settings, load_settings
from jobs.admission import Admission
from jobs.model import Job
from jobs.request_signing import (
    MIGRATION_KIND,
    REQUEST_FIELD,
    RequestRefused,
    RequestSigner,
    SignedRequest,
    check_job,
    check_record,
    signed_record,
    signer_for,
    verifier_for,
)
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore, job_key
from jobs.submission import enqueue
from lab.signing import make_certificate
from tests.conftest import RedisServer
from tests.support.registry import REGISTRY, make_fleet_keys, signing_section

SPEC = MigrationSpec(domain="web01", src="kvm1", dst="kvm2")


@dataclass
class Fleet:
    settings: Settings
    store: JobStore
    stranger: RequestSigner

    def job(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def check(self, job: Job, max_age_s: float | None = None) -> None:
        verifier = verifier_for(self.settings.security)
        if max_age_s is None:
            check_job(verifier, job)
            return
        check_record(
            verifier,
            job.request,
            job.id,
            kind=MIGRATION_KIND,
            spec=job.spec,
            max_age_s=max_age_s,
        )

    def submit(self, spec: MigrationSpec = SPEC) -> str:
        return enqueue(
            self.store,
            spec,
            origin="producer@test",
            signer=signer_for(self.settings.security),
        )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fleet's key, a store trusting it, and a stranger's key: made once (RSA is slow)."""
    keys = make_fleet_keys(tmp_path_factory.mktemp("keys"))
    make_certificate(keys / "stranger-key.pem", keys / "stranger.pem", "/CN=stranger")
    return keys


@pytest.fixture
def fleet(tmp_path: Path, redis_srv: RedisServer, keys: Path) -> Fleet:
    config = tmp_path / "drover.toml"
    config.write_text(REGISTRY.format(url=redis_srv.url) + signing_section(keys))
    store = JobStore.from_url(redis_srv.url)
    store.r.flushdb()
    stranger = RequestSigner(str(keys / "stranger-key.pem"), str(keys / "stranger.pem"))
    return Fleet(load_settings(config), store, stranger)


def refusal(fleet: Fleet, job_id: str, max_age_s: float | None = None) -> str:
    with pytest.raises(RequestRefused) as caught:
        fleet.check(fleet.job(job_id), max_age_s)
    return str(caught.value)


def test_a_submitted_job_carries_a_request_the_workers_accept(fleet: Fleet) -> None:
    job = fleet.job(fleet.submit())
    fleet.check(job)
    payload = json.loads(SignedRequest.from_json(str(job.request)).payload)
    assert payload["spec"]["domain"] == "web01" and payload["origin"] == "producer@test"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("migrate_uri", "tcp://203.0.113.9:4444"),
        ("dst", "kvm9"),
        ("dname", "other"),
        ("undefine_source", True),
        ("force", True),  # with undefine_source, the only way it means something
    ],
)
def test_a_spec_changed_in_redis_is_refused(fleet: Fleet, field: str, value: object) -> None:
    job_id = fleet.submit()
    tampered = SPEC.model_dump(mode="json") | {field: value}
    if field == "force":
        tampered["undefine_source"] = True
    fleet.store.r.hset(job_key(job_id), "spec", json.dumps(tampered))
    assert f"changed: {field}" in refusal(fleet, job_id)


def test_an_unsigned_record_is_refused(fleet: Fleet) -> None:
    job_id = enqueue(fleet.store, SPEC, origin="by hand")
    assert "no signed request" in refusal(fleet, job_id)


def test_a_request_signed_by_an_untrusted_key_is_refused(fleet: Fleet) -> None:
    job_id = enqueue(fleet.store, SPEC, origin="stranger", signer=fleet.stranger)
    assert "does not trust" in refusal(fleet, job_id)


def test_a_request_copied_onto_another_job_is_refused(fleet: Fleet) -> None:
    first = fleet.submit()
    other = fleet.submit(MigrationSpec(domain="web02", src="kvm1", dst="kvm2"))
    stolen = fleet.store.r.hget(job_key(first), REQUEST_FIELD)
    fleet.store.r.hset(
        job_key(other), mapping={REQUEST_FIELD: stolen, "spec": SPEC.model_dump_json()}
    )
    assert f"is for job {first}" in refusal(fleet, other)


def test_a_forged_signature_is_refused(fleet: Fleet) -> None:
    job_id = fleet.submit()
    signed = SignedRequest.from_json(str(fleet.job(job_id).request))
    # The payload re-written to another destination, the signature and signer kept.
    payload = json.loads(signed.payload)
    payload["spec"]["dst"] = "kvm9"
    forged = SignedRequest(json.dumps(payload), signed.signature, signed.signer)
    fleet.store.r.hset(job_key(job_id), REQUEST_FIELD, forged.to_json())
    assert "does not verify" in refusal(fleet, job_id)


def test_a_request_moved_into_another_evacuation_is_refused(fleet: Fleet) -> None:
    job_id = fleet.submit()
    fleet.store.r.hset(job_key(job_id), mapping={"parent": "0123456789ab", "parent_limit": "64"})
    assert "evacuation" in refusal(fleet, job_id)


def test_an_old_request_is_refused_at_admission_age(fleet: Fleet) -> None:
    job_id = fleet.submit()
    signer = signer_for(fleet.settings.security)
    assert signer is not None
    old = signed_record(
        signer,
        kind=MIGRATION_KIND,
        job_id=job_id,
        spec=SPEC,
        origin="producer@test",
        at=datetime.now(UTC) - timedelta(days=3),
    )
    fleet.store.r.hset(job_key(job_id), mapping=old)
    fleet.check(fleet.job(job_id))  # a running job's request does not expire
    assert "request_max_age" in refusal(fleet, job_id, max_age_s=86_400)


def test_admission_never_starts_a_forged_job(fleet: Fleet) -> None:
    good = fleet.submit()
    forged = enqueue(fleet.store, MigrationSpec(domain="web02", src="kvm1", dst="kvm2"), origin="x")
    started: list[str] = []
    admission = Admission(fleet.store, verifier_for(fleet.settings.security))
    admission.safety_pass(fleet.settings, lambda job_id, _spec: started.append(job_id))
    assert started == [good]
    job = fleet.job(forged)
    assert job.state is JobState.FAILED
    assert job.reason is not None and job.reason.startswith("security: ")
    events = [e["event"] for _, e in fleet.store.read_events(forged)]
    assert "security.rejected" in events
    assert forged not in admission.waiting_ids()


def test_the_signer_skips_the_key_check_only_for_the_file_the_signing_setup_checked(
    tmp_path: Path, redis_srv: RedisServer, keys: Path
) -> None:
    """Loading an RSA key checks its consistency (tens of ms). A producer loads its key twice,
    for Celery's signing and for the request signer: the second load skips the check only
    while the file is the very one the first load checked in this process."""
    import os
    import shutil

    from config.celery import make_app
    from config.security import key_checked
    from jobs.request_signing import forget_keys

    mine = tmp_path / "keys"
    shutil.copytree(keys, mine)
    config = tmp_path / "drover.toml"
    config.write_text(REGISTRY.format(url=redis_srv.url) + signing_section(mine))
    settings = load_settings(config)
    key = str(mine / "key.pem")
    assert not key_checked(key)  # never loaded in this process
    make_app(settings)  # Celery's signing setup: loads the key, checked
    assert key_checked(key)
    forget_keys()
    store = JobStore.from_url(redis_srv.url)
    store.r.flushdb()
    job_id = enqueue(store, SPEC, origin="producer@test", signer=signer_for(settings.security))
    check_job(verifier_for(settings.security), store.get(job_id))  # signs as before
    # The same bytes in a new file at the same path: not the file that was checked.
    (mine / "new.pem").write_bytes((mine / "key.pem").read_bytes())
    os.replace(mine / "new.pem", mine / "key.pem")
    assert not key_checked(key)
    forget_keys()
