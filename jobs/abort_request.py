"""The operator's abort of a running migration, signed where it is asked.

The record's abort flag made a source abort its migration in libvirt, and anyone with the
Redis password could set it: a migration stopped that no operator asked to stop (left alone
in earlier stops). The flag cannot simply go: a draining worker takes no message from its
queue, so the signed notice (worker/cancel_notice.py) reaches it only once it is back, and
its monitor must still see an abort asked meanwhile. So whoever asks signs it (the same key
and payload as a job's request, kind `abort`, naming the job and drover's reason), the
record keeps the signed request beside the flag, and with signing on a worker acts on the
flag only when a trusted key signed it for this job.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict

from jobs.keys import ABORT_FIELD, ABORT_SIGNED_FIELD
from jobs.request_signing import (
    REQUEST_FIELD,
    RequestSigner,
    RequestVerifier,
    check_record,
    signed_record,
)

ABORT_KIND = "abort"


class AbortAsked(BaseModel):
    """What an abort's signature covers besides the job: the reason it gives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str


def sign_abort(signer: RequestSigner | None, job_id: str, reason: str, by: str) -> str | None:
    """The signed request to keep beside the flag (None with signing off)."""
    signed = signed_record(
        signer,
        kind=ABORT_KIND,
        job_id=job_id,
        spec=AbortAsked(reason=reason),
        origin=by,
        at=datetime.now(UTC),
    )
    return signed.get(REQUEST_FIELD)


def abort_fields(reason: str, signed: str | None) -> dict[str, str]:
    """The record fields of an abort: its reason, and its signed request when there is one."""
    return {ABORT_FIELD: reason} | ({ABORT_SIGNED_FIELD: signed} if signed else {})


def genuine_abort(
    verifier: RequestVerifier | None, job_id: str, reason: str | None, signed: str | None
) -> str | None:
    """The flag's reason when it is one to act on: any flag with signing off (`verifier`
    None), else only one a trusted key signed for this job with this reason. RequestRefused
    says why a flag that is set is not."""
    if reason is None or verifier is None:
        return reason
    check_record(verifier, signed, job_id, kind=ABORT_KIND, spec=AbortAsked(reason=reason))
    return reason
