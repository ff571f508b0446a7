"""What an attacker holding the Redis password can do, done for real against the lab.

Job records written field by field (as `redis-cli HSET` would), raw messages read off one
queue and pushed onto another, and the lab workers' logs read back to see what they did.
"""

from __future__ import annotations

import json
import secrets
import signal
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import libvirt
import redis

from config.celery import host_queue
from config.redis_acl import WORKER
from jobs.admission_head import gate_names
from jobs.model import PhaseRecord
from jobs.prepared_receipt import PREPARED_FIELD, sign_prepared
from jobs.request_signing import MIGRATION_KIND, RequestSigner, signed_record
from jobs.spec import MigrationSpec
from jobs.store import ACTIVE_JOBS, JOBS_INDEX, job_key
from lab import control
from lab.layout import LabLayout
from tests.support.lab_fixtures import Lab, wait_for

LONG_AGO = timedelta(minutes=10)
CAPTURE_S = 10.0


def worker_log(host: str) -> Path:
    state = control.LabState.load(LabLayout.from_env())
    assert state is not None
    return Path(state.hosts[host].worker_log)


def log_events(host: str, needle: str) -> list[dict[str, Any]]:
    """The JSON events in `host`'s worker log whose line mentions `needle`."""
    found = []
    for line in worker_log(host).read_text().splitlines():
        if needle in line and line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def lab_signer(lab: Lab) -> RequestSigner:
    """The lab's own key: a request signed with it is one a real producer could have made."""
    sec = lab.drover.settings.security
    assert sec.key and sec.certificate
    return RequestSigner(sec.key, sec.certificate)


def domain_facts(lab: Lab, host: str, name: str) -> dict[str, Any]:
    """The facts a source preflight would have recorded, read from libvirt."""
    conn = libvirt.open(lab.uri(host))
    try:
        dom = conn.lookupByName(name)
        state = dom.state()[0]
        return {
            "name": name,
            "uuid": dom.UUIDString(),
            "state": "running" if state == libvirt.VIR_DOMAIN_RUNNING else "paused",
            "active": bool(dom.isActive()),
            "persistent": bool(dom.isPersistent()),
            "memory_mib": dom.maxMemory() // 1024,
            "vcpus": 1,
        }
    finally:
        conn.close()


@dataclass
class ForgedJob:
    id: str
    spec: MigrationSpec


def forge_job(
    lab: Lab,
    spec: MigrationSpec,
    *,
    state: str,
    facts: dict[str, Any] | None = None,
    handoff: dict[str, Any] | None = None,
    ended_phases: tuple[str, ...] = (),
    admitted: bool = True,
    signer: RequestSigner | None = None,
    prepared_on: str | None = None,
) -> ForgedJob:
    """A job record written by hand: phases `ended_phases` ended long ago, so recovery takes
    the job for one whose next phase was never sent. With `signer`, its request is signed;
    with `prepared_on` too, that host's receipt of its prepare for the guest `facts` names
    is in it from the start (jobs/prepared_receipt.py)."""
    r = lab.drover.store.r
    job_id = secrets.token_hex(6)
    then = datetime.now(UTC) - LONG_AGO
    record: dict[str, str] = {
        "id": job_id,
        "spec": spec.model_dump_json(),
        "state": state,
        "created": then.isoformat(),
        "updated": then.isoformat(),
        "facts": json.dumps(facts or {}),
        "handoff": json.dumps(handoff or {}),
    }
    if admitted:
        # Admitted as the admit script admits: the field and a slot in each of its gates
        # (the field alone proves nothing to a worker: jobs/admission_head.py slots_of).
        record["admitted"] = then.isoformat()
        for gate, _ in gate_names(spec):
            r.sadd(gate, job_id)
    # What a producer writes (jobs/request_signing.py), as it would have signed it then.
    record |= signed_record(
        signer,
        kind=MIGRATION_KIND,
        job_id=job_id,
        spec=spec,
        origin="producer@forger",
        at=then,
    )
    if prepared_on is not None:
        uuid = str((facts or {})["uuid"])
        receipt = sign_prepared(signer, job_id, prepared_on, uuid, then)
        assert receipt is not None, "a receipt needs the signer"
        record[PREPARED_FIELD] = receipt
    r.hset(job_key(job_id), mapping=record)
    for phase in ended_phases:
        rec = PhaseRecord(phase=phase, host="forger", started=then, ended=then)
        r.hset(f"{job_key(job_id)}:phases", phase, rec.model_dump_json())
    r.zadd(JOBS_INDEX, {job_id: then.timestamp()})
    r.sadd(ACTIVE_JOBS, job_id)
    return ForgedJob(job_id, spec)


def role_redis(role: str) -> redis.Redis:
    """The lab's Redis as one of its ACL users (config/redis_acl.py)."""
    state = control.LabState.load(LabLayout.from_env())
    assert state is not None
    return redis.Redis.from_url(state.url(role))


def capture(lab: Lab, task: str, job_id: str, host: str) -> bytes:
    """A real message drover's producer sends to `host` (signed, enveloped), copied off the
    host's queue with the worker's Redis credential (which may read host queues) while the
    host's worker is down; then the worker comes back and runs it: what is returned has been
    delivered once. (A running worker's blocked BRPOP takes a message as it lands.)"""
    reader = role_redis(WORKER)
    control.kill_worker(host, signal.SIGTERM)
    try:
        lab.drover.send(lab.drover._app.signature(task, args=(job_id,), queue=host_queue(host)))
        wait_for(lambda: bool(reader.llen(host_queue(host))), CAPTURE_S, "the message")
        (raw,) = reader.lrange(host_queue(host), 0, 0)
    finally:
        control.restart_worker(host)
    assert isinstance(raw, bytes), "the message was not caught"
    return raw


def reheaded(raw: bytes, task: str) -> bytes:
    """The same message (body and signature untouched) with another task name in its headers."""
    message = json.loads(raw)
    message["headers"]["task"] = task
    message["headers"]["id"] = str(uuid.uuid4())
    return json.dumps(message).encode()


def message_id(raw: bytes) -> str:
    return str(json.loads(raw)["headers"]["id"])


def push(lab: Lab, host: str, raw: bytes) -> None:
    """Put a raw message straight onto a host's queue (kombu's Redis transport is a list)."""
    lab.drover.store.r.lpush(host_queue(host), raw)
