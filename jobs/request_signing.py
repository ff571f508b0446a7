"""Signed requests: what a producer asked for, signed with its key, checked by every worker.

Celery's `auth` serializer signs a task message's body, and a drover task message carries only
a job id: everything a phase acts on comes from the job record in Redis, which anyone with the
Redis password can write. So the request itself is signed where it is made (the CLI, the
Python API, beat, or the worker that plans an evacuation) and verified by the worker before
each phase, before admission starts a job and before recovery sends anything:

    payload   = canonical JSON of {v, kind, job_id, spec, parent, parent_limit, origin, at}
    signature = RSA-PSS(SHA-256) over the payload with the signer's key
    signer    = SHA-256 fingerprint of the signer's certificate (DER)

The record keeps the payload, the signature and the signer in one field (`request`). A worker
accepts it only when the signer's certificate is in its cert store (`[security] cert_store`,
the same store that vouches for signed task messages), the signature verifies, the payload
names this job, and the spec the record shows is the spec that was signed. A record that no
trusted key signed, or that was changed since, is refused: the job ends `failed` and the VM is
untouched.

With signing off (`[security] insecure = true`, never on a real fleet) nothing is signed and
nothing is checked.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel

from config.settings import Security
from jobs.request_crypto import MIGRATION_KIND as MIGRATION_KIND
from jobs.request_crypto import REQUEST_FIELD as REQUEST_FIELD
from jobs.request_crypto import SECURITY_REASON as SECURITY_REASON
from jobs.request_crypto import Request as Request
from jobs.request_crypto import RequestRefused as RequestRefused
from jobs.request_crypto import RequestSigner as RequestSigner
from jobs.request_crypto import RequestVerifier as RequestVerifier
from jobs.request_crypto import SignedRequest as SignedRequest
from jobs.request_crypto import TrustStore as TrustStore
from jobs.request_crypto import canonical as canonical

if TYPE_CHECKING:
    from jobs.model import Job


def signed_record(
    signer: RequestSigner | None,
    *,
    kind: str,
    job_id: str,
    spec: BaseModel,
    origin: str,
    at: datetime,
    parent: str | None = None,
    parent_limit: int | None = None,
) -> dict[str, str]:
    """The record field holding the signed request (nothing with signing off)."""
    if signer is None:
        return {}
    payload = canonical(
        kind=kind,
        job_id=job_id,
        spec=spec.model_dump(mode="json"),
        parent=parent,
        parent_limit=parent_limit,
        origin=origin,
        at=at,
    )
    return {REQUEST_FIELD: signer.sign(payload).to_json()}


def check_record(
    verifier: RequestVerifier | None,
    raw: str | None,
    job_id: str,
    *,
    kind: str,
    spec: BaseModel,
    parent: str | None = None,
    parent_limit: int | None = None,
    max_age_s: float | None = None,
) -> Request | None:
    """The verified request of a record whose `spec` (and evacuation) is what was signed.

    RequestRefused when it is not; None with signing off (nothing to check).
    """
    if verifier is None:
        return None
    request = verifier.verify(raw, job_id)
    if request.kind != kind:
        raise RequestRefused(f"the signed request is for a {request.kind[:20]}, not a {kind}")
    try:
        signed_spec = type(spec).model_validate(request.spec)
    except ValueError:
        raise RequestRefused("the signed request's spec is not valid") from None
    if signed_spec != spec:
        changed = sorted(
            k for k, v in spec.model_dump().items() if signed_spec.model_dump().get(k) != v
        )
        fields = ", ".join(changed)
        raise RequestRefused(f"the job's spec is not what was signed (changed: {fields})")
    if (request.parent, request.parent_limit) != (parent, parent_limit):
        raise RequestRefused("the job's evacuation is not the one that was signed")
    if max_age_s is not None and request.age_s() > max_age_s:
        raise RequestRefused(
            f"the request was signed {request.age_s():.0f}s ago, longer than "
            f"request_max_age ({max_age_s:.0f}s)"
        )
    return request


def check_job(verifier: RequestVerifier | None, job: Job) -> Request | None:
    """`check_record` for a migration job as read back from the store."""
    return check_record(
        verifier,
        job.request,
        job.id,
        kind=MIGRATION_KIND,
        spec=job.spec,
        parent=job.parent,
        parent_limit=job.parent_limit,
    )


_signers: dict[tuple[str, str, str], RequestSigner] = {}
_verifiers: dict[tuple[str, str], RequestVerifier] = {}
_cache_lock = threading.Lock()


def signer_for(security: Security) -> RequestSigner | None:
    """This process's signer (None with signing off); one per key, loaded once."""
    if not security.signing:
        return None
    assert security.key and security.certificate
    ident = (security.key, security.certificate, security.digest)
    from config.security import key_checked  # Celery's: a signing process has it loaded

    with _cache_lock:
        if ident not in _signers:
            _signers[ident] = RequestSigner(*ident, checked=key_checked(security.key))
        return _signers[ident]


def verifier_for(security: Security) -> RequestVerifier | None:
    """This process's verifier (None with signing off: nothing is checked)."""
    if not security.signing:
        return None
    assert security.cert_store
    ident = (security.cert_store, security.digest)
    with _cache_lock:
        if ident not in _verifiers:
            _verifiers[ident] = RequestVerifier(TrustStore(security.cert_store), security.digest)
        return _verifiers[ident]


def forget_keys() -> None:
    """Drop the keys loaded so far: a process that talks to a lab brought up again (the
    test suite, tests/faults/test_sentinel_failover.py) finds new keys at the same paths."""
    with _cache_lock:
        _signers.clear()
        _verifiers.clear()
