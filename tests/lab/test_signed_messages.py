"""Signed task messages in the real lab: forged messages are refused and nothing runs.

The lab signs by default. A forger who can write to Redis publishes a phase task straight into
a host's queue with kombu, naming a real job: once as plain JSON (unsigned) and once signed
with a key of its own (a certificate the workers do not trust, and one that copies the lab
certificate's issuer and serial number). The worker logs `message.rejected`; no phase starts,
libvirt is untouched; drover's own jobs still run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.security.certificate import Certificate
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer
from cryptography import x509
from kombu import Connection, Exchange, Queue

from config.celery import host_queue
from config.settings import load_settings
from jobs.phases import Phase, task_name
from jobs.spec import MigrationSpec
from lab import control
from lab.layout import LabLayout
from lab.proc import alive
from lab.signing import make_certificate
from tests.support.forgery import worker_log
from tests.support.lab_fixtures import Lab, wait_for

pytestmark = pytest.mark.lab
SETTLE_S = 3.0


def task_message(job_id: str) -> tuple[dict[str, Any], Any]:
    """Headers and body of a protocol-2 message for source_preflight, as Celery builds them."""
    plain = Celery("forger", set_as_current=False)
    msg = plain.amqp.as_task_v2(
        str(uuid.uuid4()), task_name(Phase.SOURCE_PREFLIGHT), args=(job_id,), kwargs={}
    )
    return msg.headers, msg.body


def publish(lab: Lab, host: str, headers: dict[str, Any], body: Any, **how: Any) -> None:
    queue = host_queue(host)
    exchange = Exchange(queue, "direct")
    with Connection(lab.drover.settings.redis_url) as conn:
        conn.Producer().publish(
            body,
            exchange=exchange,
            routing_key=queue,
            headers=headers,
            declare=[Queue(queue, exchange, routing_key=queue)],
            **how,
        )


def unsigned(lab: Lab, job_id: str, _: Path) -> str:
    headers, body = task_message(job_id)
    publish(lab, "lab1", headers, body, serializer="json")
    return str(headers["id"])


def signed_by(make: Callable[[Path, Path], None]) -> Callable[[Lab, str, Path], str]:
    def forge(lab: Lab, job_id: str, tmp: Path) -> str:
        key, cert = tmp / "forger-key.pem", tmp / "forger-cert.pem"
        make(key, cert)
        serializer = SecureSerializer(
            PrivateKey(key.read_text()), Certificate(cert.read_text()), None
        )
        headers, body = task_message(job_id)
        publish(
            lab,
            "lab1",
            headers,
            serializer.serialize(body),
            content_type="application/data",
            content_encoding="utf-8",
        )
        return str(headers["id"])

    return forge


def stranger(key: Path, cert: Path) -> None:
    make_certificate(key, cert, "/CN=not drover")


def impostor(key: Path, cert: Path) -> None:
    """A certificate with the lab certificate's issuer and serial: Celery's signer id."""
    settings = load_settings(LabLayout.from_env().config_path)
    real = x509.load_pem_x509_certificate(Path(str(settings.security.certificate)).read_bytes())
    issuer = real.issuer.rfc4514_string()
    make_certificate(key, cert, f"/{issuer}", serial=real.serial_number)


# What Celery's consumer writes for each message it discards (its log, with a traceback).
CELERY_REJECTION_LINES = ("Received invalid task message", "Traceback (most recent call last)")


@pytest.mark.parametrize(
    "forge",
    [unsigned, signed_by(stranger), signed_by(impostor)],
    ids=["unsigned-json", "signed-by-stranger", "signed-by-impostor"],
)
def test_forged_task_message_is_rejected_and_nothing_runs(
    lab: Lab, tmp_path: Path, forge: Callable[[Lab, str, Path], str]
) -> None:
    lab.home("idle-1")
    before = lab.view("lab1", "idle-1")
    spec = MigrationSpec(domain="idle-1", src="lab1", dst="lab2")
    job_id = lab.drover.store.create(spec, host="forger")
    log = worker_log("lab1")
    celery_said = [log.read_text().count(text) for text in CELERY_REJECTION_LINES]
    try:
        message_id = forge(lab, job_id, tmp_path)
        wait_for(lambda: message_id in log.read_text(), 30, "the worker to log the rejection")
        time.sleep(SETTLE_S)  # give a wrongly accepted message time to start a phase
        rejected = [line for line in log.read_text().splitlines() if message_id in line]
        assert any('"event": "message.rejected"' in line for line in rejected), rejected
        # Said once, by drover: not again by Celery, a dozen lines with a traceback each time.
        assert [log.read_text().count(text) for text in CELERY_REJECTION_LINES] == celery_said
        job = lab.drover.job(job_id)
        assert job.state.value == "queued" and not job.phases
        assert lab.view("lab1", "idle-1") == before
        assert not lab.view("lab2", "idle-1").exists
    finally:
        lab.drover.store.discard(job_id)


# Queue items that are not messages at all: each used to stop the worker that popped it
# (kombu's JSON read, its message shape, a body that is not base64) before any check ran.
NOT_MESSAGES = (
    "garbage",
    "[]",
    "null",
    "123",
    '{"body": "%%% not base64 %%%", "headers": {}, "content-type": "application/json",'
    ' "content-encoding": "utf-8", "properties": {"body_encoding": "base64",'
    ' "delivery_tag": "x", "delivery_info": {"exchange": "", "routing_key": "x"}}}',
)


def test_items_that_are_not_messages_are_dropped_and_the_worker_goes_on(lab: Lab) -> None:
    """Anyone who may push onto a host's queue must not be able to stop its worker."""
    state = control.LabState.load(LabLayout.from_env())
    assert state is not None
    pid = state.hosts["lab1"].worker_pid
    log = worker_log("lab1")
    seen = log.read_text().count("not a message, dropped from the queue")
    lab.home("idle-1")
    for item in NOT_MESSAGES:
        lab.drover.store.r.lpush(host_queue("lab1"), item)
    wait_for(
        lambda: (
            log.read_text().count("not a message, dropped from the queue")
            >= seen + len(NOT_MESSAGES)
        ),
        30,
        "the worker to drop every item",
    )
    assert alive(pid), "the worker stopped on an item that is not a message"
    assert lab.drover.store.r.llen(host_queue("lab1")) == 0
    job = lab.migrate("idle-1", "lab1", "lab2")
    assert job.state.value == "succeeded", job.reason
    assert lab.view("lab2", "idle-1").active and not lab.view("lab1", "idle-1").active
    assert alive(pid)
    lab.home("idle-1")


def test_signed_jobs_still_succeed_and_keep_secrets(lab: Lab) -> None:
    lab.home("idle-1")
    job = lab.migrate("idle-1", "lab1", "lab2")
    assert job.state.value == "succeeded", job.reason
    assert lab.view("lab2", "idle-1").active
    password = lab.drover.settings.redis_url.split(":")[2].split("@")[0]
    assert len(password) >= 16
    events = [str(e) for e in lab.drover.events(job.id)]
    assert events and not any(password in e for e in events)
    for host in ("lab1", "lab2"):
        assert password not in worker_log(host).read_text()
    lab.home("idle-1")
