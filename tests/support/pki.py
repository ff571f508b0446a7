"""A throwaway CA and certificates for 127.0.0.1, for tests of TLS servers (Flower, Redis).

Made with the lab's own openssl helpers (lab/tls.py), in a temporary directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lab.layout import LabLayout
from lab.proc import run
from lab.tls import CertificateAuthority, create_ca, openssl_req

PKI_LAB_ID = 7  # only names the CA
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Pair:
    key: Path
    cert: Path


@dataclass(frozen=True)
class LoopbackPki:
    ca: CertificateAuthority

    @classmethod
    def create(cls, directory: Path) -> LoopbackPki:
        return cls(create_ca(LabLayout(lab_id=PKI_LAB_ID, dir=directory)))

    def issue(self, role: str) -> Pair:
        """A `server` or `client` key and certificate for 127.0.0.1, signed by the CA."""
        pair = Pair(self.ca.dir / f"{role}-key.pem", self.ca.dir / f"{role}-cert.pem")
        argv = openssl_req(self.ca.config, role, f"/CN={LOOPBACK}", pair.key, pair.cert)
        signed = ["-CA", str(self.ca.cert), "-CAkey", str(self.ca.key)]
        run([*argv, *signed, "-addext", f"subjectAltName=IP:{LOOPBACK}"])
        return pair
