"""The cryptography of signed requests: canonical payloads, RSA-PSS signing, the trust store
and verification. What is signed, and when it is checked, is jobs/request_signing.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: a command that signs nothing should not pay for it
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

from jobs.request_fields import MIGRATION_KIND as MIGRATION_KIND
from jobs.request_fields import REQUEST_FIELD as REQUEST_FIELD

# How a job refused for its request says so in its reason (and `security.rejected` events).
SECURITY_REASON = "security"
REQUEST_VERSION = 1
# A request signed this far in the future comes from a clock nobody should trust.
MAX_CLOCK_SKEW_S = 300.0
MAX_REQUEST_BYTES = 16_384
DIGESTS = ("sha256", "sha384", "sha512")


class RequestRefused(Exception):
    """The job's request is not one a trusted producer signed; the message is one line."""


@dataclass(frozen=True)
class SignedRequest:
    """What a job record carries in its `request` field."""

    payload: str
    signature: str  # base64
    signer: str  # certificate fingerprint, hex

    def to_json(self) -> str:
        return json.dumps({"payload": self.payload, "sig": self.signature, "signer": self.signer})

    @classmethod
    def from_json(cls, raw: str) -> SignedRequest:
        if len(raw) > MAX_REQUEST_BYTES:
            raise RequestRefused("the signed request is too large")
        try:
            data = json.loads(raw)
            return cls(str(data["payload"]), str(data["sig"]), str(data["signer"]))
        except (ValueError, KeyError, TypeError):
            raise RequestRefused("the signed request is malformed") from None


@dataclass(frozen=True)
class Request:
    """A verified request: who asked for what, and when."""

    kind: str
    job_id: str
    spec: dict[str, Any]
    parent: str | None
    parent_limit: int | None
    origin: str
    at: datetime
    signer: str  # the certificate's subject, for events and logs

    def age_s(self) -> float:
        return (datetime.now(UTC) - self.at).total_seconds()


def canonical(
    *,
    kind: str,
    job_id: str,
    spec: dict[str, Any],
    parent: str | None,
    parent_limit: int | None,
    origin: str,
    at: datetime,
) -> str:
    """The exact bytes that are signed: sorted keys, no spaces, so both sides agree."""
    body = {
        "v": REQUEST_VERSION,
        "kind": kind,
        "job_id": job_id,
        "spec": spec,
        "parent": parent,
        "parent_limit": parent_limit,
        "origin": origin,
        "at": at.isoformat(),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(name: str) -> hashes.HashAlgorithm:
    from cryptography.hazmat.primitives import hashes

    if name not in DIGESTS:
        raise ValueError(f"unknown digest {name!r}")
    algorithm: hashes.HashAlgorithm = getattr(hashes, name.upper())()
    return algorithm


def fingerprint(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _pss(algorithm: hashes.HashAlgorithm) -> padding.PSS:
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.MAX_LENGTH)


class RequestSigner:
    """Signs requests with this machine's key (`[security] key` and `certificate`)."""

    def __init__(
        self, key_path: str, cert_path: str, digest: str = "sha256", *, checked: bool = False
    ) -> None:
        """`checked`: this process has just loaded the same file, and checked the key's
        consistency then (config/security.py key_checked); the check is not made twice."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = serialization.load_pem_private_key(
            Path(key_path).read_bytes(), password=None, unsafe_skip_rsa_key_validation=checked
        )
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the signing key must be an RSA key")
        self._key = key
        self._cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        self._digest = _digest(digest)
        self.signer = fingerprint(self._cert)

    def sign(self, payload: str) -> SignedRequest:
        sig = self._key.sign(payload.encode(), _pss(self._digest), self._digest)
        return SignedRequest(payload, base64.b64encode(sig).decode(), self.signer)


class TrustStore:
    """The certificates in `[security] cert_store`, by fingerprint; re-read when it changes."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[str, float], ...] | None = None
        self._certs: dict[str, x509.Certificate] = {}

    def _snapshot(self) -> tuple[tuple[str, float], ...]:
        files = sorted(p for p in self.directory.iterdir() if p.is_file())
        return tuple((p.name, p.stat().st_mtime) for p in files)

    def get(self, signer: str) -> x509.Certificate | None:
        from cryptography import x509

        with self._lock:
            stamp = self._snapshot()
            if stamp != self._stamp:
                certs: dict[str, x509.Certificate] = {}
                for name, _ in stamp:
                    try:
                        cert = x509.load_pem_x509_certificate((self.directory / name).read_bytes())
                    except ValueError:
                        continue  # not a certificate: trusts nothing
                    certs[fingerprint(cert)] = cert
                self._certs, self._stamp = certs, stamp
            return self._certs.get(signer)


class RequestVerifier:
    """Checks a record's signed request against the trusted certificates."""

    def __init__(self, store: TrustStore, digest: str = "sha256") -> None:
        self.store = store
        self._digest = _digest(digest)

    def verify(self, raw: str | None, job_id: str) -> Request:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric import rsa

        if not raw:
            raise RequestRefused("the job carries no signed request")
        signed = SignedRequest.from_json(raw)
        cert = self.store.get(signed.signer)
        if cert is None:
            raise RequestRefused("the request is signed by a key this worker does not trust")
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise RequestRefused("the request's signing certificate is not valid now")
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise RequestRefused("the request's signing certificate has no RSA key")
        try:
            sig = base64.b64decode(signed.signature, validate=True)
            key.verify(sig, signed.payload.encode(), _pss(self._digest), self._digest)
        except (InvalidSignature, binascii.Error, ValueError):
            raise RequestRefused("the request's signature does not verify") from None
        return _parsed(signed.payload, job_id, _subject(cert))


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()[:200]


def _parsed(payload: str, job_id: str, signer: str) -> Request:
    try:
        body = json.loads(payload)
        request = Request(
            kind=str(body["kind"]),
            job_id=str(body["job_id"]),
            spec=dict(body["spec"]),
            parent=body["parent"],
            parent_limit=body["parent_limit"],
            origin=str(body["origin"]),
            at=datetime.fromisoformat(str(body["at"])),
            signer=signer,
        )
        version = body["v"]
    except (ValueError, KeyError, TypeError):
        raise RequestRefused("the signed request is malformed") from None
    if version != REQUEST_VERSION:
        raise RequestRefused(f"unknown signed request version {version!r}")
    if request.job_id != job_id:
        raise RequestRefused(f"the signed request is for job {request.job_id}, not {job_id}")
    if request.at.tzinfo is None or request.age_s() < -MAX_CLOCK_SKEW_S:
        raise RequestRefused("the signed request's time is not believable")
    return request
