"""Whether the migration TLS files QEMU would read could serve it: each parses as what its
name says, is valid now, a key belongs to its certificate, and a certificate was issued by the
CA beside it.

Files that are merely present (a truncated copy, last year's certificate, the key of another
host) pass a presence check and fail the migration only after QEMU has started on the
destination, in GnuTLS's words ("Error in the pull function"). Judged here, they refuse the
job before anything moves, naming the file and what is wrong with it. Read on the worker, in
the host's own mount namespace (worker/tls_facts.py finds the directory).

A key encrypted with a passphrase is QEMU's to open (qemu.conf's `migrate_tls_x509_secret_uuid`
names the secret): it is not opened here, and its pairing is left to QEMU.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

CA_FILE = "ca-cert.pem"
SERVER_PAIR = ("server-cert.pem", "server-key.pem")
CLIENT_PAIR = ("client-cert.pem", "client-key.pem")
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class Unusable(Exception):
    """A file QEMU could not use; the message names it and says why, in one line."""


def certificate_problem(
    cert_dir: Path, destination: bool, now: datetime | None = None
) -> str | None:
    """Why the files one side of a `--tls` migration reads in `cert_dir` would not serve QEMU
    (None: they would). The destination is the TLS server: its CA and server pair. The source
    is the client: its CA, and its client pair only if one is there (QEMU's is optional)."""
    at = now or datetime.now(UTC)
    try:
        cas = _certificates(cert_dir / CA_FILE)
        if not any(_valid_at(ca, at) for ca in cas):
            raise Unusable(f"{CA_FILE} {_validity(cas[0], at)}")
        if destination:
            _pair(cert_dir, SERVER_PAIR, cas, at)
        elif any((cert_dir / name).exists() for name in CLIENT_PAIR):
            _pair(cert_dir, CLIENT_PAIR, cas, at)
    except Unusable as exc:
        return str(exc)
    return None


def _pair(
    cert_dir: Path, names: tuple[str, str], cas: list[x509.Certificate], at: datetime
) -> None:
    cert_name, key_name = names
    cert = _certificates(cert_dir / cert_name)[0]
    if not _valid_at(cert, at):
        raise Unusable(f"{cert_name} {_validity(cert, at)}")
    if not any(_issued_by(cert, ca) for ca in cas):
        raise Unusable(f"{cert_name} was not issued by the CA in {CA_FILE}")
    key = _private_key(cert_dir / key_name)
    if key is not None and key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(
        *_SPKI
    ):
        raise Unusable(f"{key_name} is not the key of {cert_name}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Unusable(f"cannot read {path.name}: {exc.strerror or exc}") from None


def _certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise Unusable(f"{path.name} is not a PEM certificate") from None


def _private_key(path: Path) -> PrivateKeyTypes | None:
    data = _read(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: QEMU opens it with the secret qemu.conf names
        return None
    except (ValueError, UnsupportedAlgorithm):
        raise Unusable(f"{path.name} is not a PEM private key") from None


def _valid_at(cert: x509.Certificate, at: datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def _validity(cert: x509.Certificate, at: datetime) -> str:
    if at < cert.not_valid_before_utc:
        return f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
