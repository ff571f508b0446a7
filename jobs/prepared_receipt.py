"""The destination's signed word that it prepared a job: what perform needs before it moves.

The job's state and its phase records are Redis writes like any other. Anyone with a Redis
password can take the destination's prepare message off its queue, write the prepare phase
ended and the job `prepared`; recovery then sends perform, and the guest would go to a host
that checked nothing (maintenance, room, CPU, definitions) and booked nothing (attacker
probe). So the destination's prepare ends by signing a receipt with its worker's key: this
job, this host, this guest (its libvirt UUID, as the source's libvirtd showed it). The
source's perform refuses to migrate without one that a trusted key signed for the guest it is
about to send there (worker/phase_perform.py).

With signing off nothing is signed and nothing is checked, as for requests.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from jobs.request_fields import PREPARED_FIELD as PREPARED_FIELD
from jobs.request_signing import (
    REQUEST_FIELD,
    RequestRefused,
    RequestSigner,
    RequestVerifier,
    check_record,
    signed_record,
)

PREPARED_KIND = "prepared"  # what a destination's receipt is


class Prepared(BaseModel):
    """What a destination signs when its prepare is done."""

    host: str
    uuid: str


def sign_prepared(
    signer: RequestSigner | None, job_id: str, host: str, uuid: str, at: datetime
) -> str | None:
    """The receipt for the record (None with signing off)."""
    signed = signed_record(
        signer,
        kind=PREPARED_KIND,
        job_id=job_id,
        spec=Prepared(host=host, uuid=uuid),
        origin=host,
        at=at,
    )
    return signed.get(REQUEST_FIELD)


def check_prepared(
    verifier: RequestVerifier | None, raw: str | None, job_id: str, host: str, uuid: str
) -> None:
    """RequestRefused unless a trusted key signed that `host` prepared `job_id` for the guest
    `uuid` (nothing is checked with signing off)."""
    if verifier is None:
        return
    if not raw:
        raise RequestRefused(f"{host} never said it prepared this job (no signed receipt)")
    check_record(verifier, raw, job_id, kind=PREPARED_KIND, spec=Prepared(host=host, uuid=uuid))
