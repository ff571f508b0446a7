"""QEMU migration TLS files for tests: a CA, and a server and a client pair it issued (EC
keys: quick to make), written where a qemu.conf names them (worker/tls_facts.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Every certificate is valid a year around the time the test runs; tests that judge dates pass
# their own `now`.
NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    *,
    start: datetime = NOW - DAY,
    end: datetime = NOW + 365 * DAY,
) -> bytes:
    issuer_cn, issuer_key = issuer or (cn, key)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    crypt = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, crypt)


class Certs:
    """A CA and a server and client pair it issued, written into one directory."""

    def __init__(
        self, root: Path, *, server: bool = True, client: bool = True, exist_ok: bool = False
    ) -> None:
        self.dir = root / "certs"
        self.dir.mkdir(parents=True, exist_ok=exist_ok)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.server_key = ec.generate_private_key(ec.SECP256R1())
        self.client_key = ec.generate_private_key(ec.SECP256R1())
        ca = ("drover-ca", self.ca_key)
        self.write("ca-cert.pem", make_cert("drover-ca", self.ca_key))
        if server:
            self.write("server-cert.pem", make_cert("kvm2", self.server_key, ca))
            self.write("server-key.pem", key_pem(self.server_key))
        if client:
            self.write("client-cert.pem", make_cert("kvm1", self.client_key, ca))
            self.write("client-key.pem", key_pem(self.client_key))
        self.conf = root / "qemu.conf"
        if not self.conf.exists():
            self.conf.write_text(f'migrate_tls_x509_cert_dir = "{self.dir}"\n')

    def write(self, name: str, data: bytes) -> None:
        (self.dir / name).write_bytes(data)
