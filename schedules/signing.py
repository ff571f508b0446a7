"""A schedule's request signed like any request, and checked before it fires.

A worker creates (and signs) the evacuation when a schedule fires, so an entry written into
Redis by hand must not be able to drain a host: `drover schedule add` signs the record, and
the worker checks the signature against today's record before it starts anything.
"""

from __future__ import annotations

from datetime import datetime

from config.settings import Settings
from jobs.request_signing import (
    REQUEST_FIELD,
    check_record,
    signed_record,
    signer_for,
    verifier_for,
)
from schedules.records import SCHEDULE_KIND, SIGNED_FIELD, ScheduleRecord


def signed_fields(
    settings: Settings, record: ScheduleRecord, by: str, at: datetime
) -> dict[str, str]:
    """The entry's hash fields holding the signed request (none while signing is off)."""
    signed = signed_record(
        signer_for(settings.security),
        kind=SCHEDULE_KIND,
        job_id=record.id,
        spec=record,
        origin=by,
        at=at,
    )
    return {SIGNED_FIELD: signed[REQUEST_FIELD]} if REQUEST_FIELD in signed else {}


def verify_record(settings: Settings, record: ScheduleRecord, signed: str | None) -> None:
    """RequestRefused unless a trusted key signed `record` as it stands."""
    verifier = verifier_for(settings.security)
    check_record(verifier, signed, record.id, kind=SCHEDULE_KIND, spec=record)
