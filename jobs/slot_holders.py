"""The holders of a full gate's slots, checked against their signed requests.

A slot set is anyone's to write with the Redis password: `SADD drover:slots:in:lab3 fakeA
fakeB`, beside two records written `migrating`, filled lab3's inbound gate with jobs that do
not exist, and every real job toward lab3 waited, `queued`, for as long as the fakes stayed
(probe: over two minutes, through nine safety passes; for ever, with no end). The pruning
script takes out only the slots of jobs whose record is gone or says they ended. With signing
on, a slot is only ever taken by the admit script for a job whose request a trusted key signed
(jobs/admission_head.py), so a holder whose record carries no such request did not come from
drover: its slot is removed, and said (`security.rejected`).

Read only for the gates some lane is blocked on, at each safety pass: the gates that stall.
"""

from __future__ import annotations

from typing import cast

from config.events import get_logger
from jobs.record import MalformedRecord
from jobs.request_signing import RequestRefused, RequestVerifier, check_job
from jobs.store import JobNotFound, JobStore


def unsigned_holders(store: JobStore, verifier: RequestVerifier, gate: str) -> list[str]:
    """The members of `gate` whose record carries no request a trusted key signed."""
    found = []
    for member in sorted(cast(set[str], store.r.smembers(gate))):
        try:
            check_job(verifier, store.get(member))
        except (MalformedRecord, RequestRefused):  # (a malformed record is a JobNotFound too)
            found.append(member)
        except JobNotFound:
            continue  # gone: the pruning script's to take out
    return found


def prune_unsigned(store: JobStore, verifier: RequestVerifier | None, gates: list[str]) -> None:
    """Take out of `gates` every slot held by a record no trusted key signed (signing on)."""
    if verifier is None:
        return
    for gate in gates:
        for member in unsigned_holders(store, verifier, gate):
            store.r.srem(gate, member)
            get_logger().warning(  # looked up here: producers import this, never log
                "security.rejected",
                reason=f"a slot of {gate} held by {member}, whose record carries no request "
                "a trusted key signed: removed",
            )
