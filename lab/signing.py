"""The lab's message-signing identity: one RSA key and self-signed certificate per lab.

`drover lab up` signs every task message (Celery's `auth` serializer, docs/security.md). The
lab's producer and all its workers share this one identity; a real fleet gives each producer
and each worker its own key and installs only the certificates it trusts in the cert store.
The cert store is a directory Celery reads whole, so it holds certificates and nothing else.
Made with the `openssl` CLI, like lab/tls.py.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from jobs.request_signing import forget_keys
from lab.layout import LabLayout
from lab.proc import run
from lab.tls import openssl_req

# Keys come from lab.tls.openssl_req: RSA, which Celery's `auth` serializer requires.
OPENSSL_CONF = """\
[req]
distinguished_name = dn
[dn]
[signing]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
subjectKeyIdentifier = hash
"""


@dataclass(frozen=True)
class SigningIdentity:
    dir: Path

    @property
    def key(self) -> Path:
        return self.dir / "signing-key.pem"

    @property
    def certificate(self) -> Path:
        return self.dir / "signing-cert.pem"

    @property
    def cert_store(self) -> Path:
        return self.dir / "trusted"


def make_certificate(key: Path, cert: Path, subject: str, *, serial: int | None = None) -> None:
    """A fresh RSA key and a self-signed signing certificate for it."""
    config = key.parent / "openssl-signing.cnf"
    config.write_text(OPENSSL_CONF)
    argv = openssl_req(config, "signing", subject, key, cert)
    if serial is not None:
        argv += ["-set_serial", str(serial)]
    run(argv)
    key.chmod(0o600)


def create_signing_identity(lab: LabLayout) -> SigningIdentity:
    """The lab's key, its certificate, and a cert store trusting exactly that certificate."""
    ident = SigningIdentity(lab.dir / "signing")
    ident.dir.mkdir(parents=True, exist_ok=True)
    ident.dir.chmod(0o700)
    make_certificate(ident.key, ident.certificate, f"/CN=drover lab {lab.lab_id} signing")
    ident.cert_store.mkdir(exist_ok=True)
    shutil.copyfile(ident.certificate, ident.cert_store / "drover-lab.pem")
    # A process that talked to an earlier lab of this id (a test session bringing a lab up
    # again) holds the old key from these very paths: it would sign what no worker trusts.
    forget_keys()
    return ident


def config_lines(ident: SigningIdentity) -> list[str]:
    """The `[security]` section of the lab's drover.toml."""
    return [
        "[security]",
        "signing = true",
        f'key = "{ident.key}"',
        f'certificate = "{ident.certificate}"',
        f'cert_store = "{ident.cert_store}"',
        "",
    ]
