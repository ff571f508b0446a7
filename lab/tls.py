"""The lab's TLS material: one CA per lab and, per host, a server and a client certificate.

`drover lab up --tls` needs it twice over: libvirtd listens for qemu+tls:// (the source
libvirtd is the TLS client in a peer-to-peer migration, the destination's the server), and
QEMU encrypts the migration stream itself when a job asks for VIR_MIGRATE_TLS.

Every file is written into the host's own /etc/pki, which is bind-mounted over /etc/pki inside
the host's mount namespace like libvirt's directories, at the paths libvirt and QEMU read by
default. So no config names a certificate file, no URI needs `pkipath=`, and a host of a lab
without --tls simply has an empty /etc/pki: asking it for TLS fails instead of silently
finding some other certificate.

Each certificate carries the host's address as CN and as an IP subjectAltName, since peers
are reached by address and both libvirt and QEMU check the name they dialled against it; and
the host's name (lab2) as a DNS subjectAltName, the name `--tls-destination lab2` makes QEMU
check instead (the address, then, no longer). The
CA key stays in the lab's directory, outside every host. Made with the `openssl` CLI.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lab.layout import HostLayout, LabLayout
from lab.proc import run

PKI_DIR = "/etc/pki"
# Where QEMU's migration TLS looks (qemu.conf migrate_/default_tls_x509_cert_dir).
QEMU_CERT_DIR = f"{PKI_DIR}/qemu"
VALID_DAYS = 3650
RSA_BITS = 2048

# libvirt's fixed default paths, relative to /etc/pki, by (role, part).
LIBVIRT_FILES = {
    ("ca", "cert"): "CA/cacert.pem",
    ("server", "cert"): "libvirt/servercert.pem",
    ("server", "key"): "libvirt/private/serverkey.pem",
    ("client", "cert"): "libvirt/clientcert.pem",
    ("client", "key"): "libvirt/private/clientkey.pem",
}
# The names QEMU's tls-creds-x509 object expects in its directory, by (role, part).
QEMU_FILES = {
    ("ca", "cert"): "ca-cert.pem",
    ("server", "cert"): "server-cert.pem",
    ("server", "key"): "server-key.pem",
    ("client", "cert"): "client-cert.pem",
    ("client", "key"): "client-key.pem",
}

# One extension section per kind of certificate. libvirt and QEMU both check key usage and
# purpose, and refuse a server certificate without serverAuth (or a client one without
# clientAuth) or a CA without keyCertSign.
OPENSSL_CONF = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class CertificateAuthority:
    """The lab's CA: its certificate, its key and the openssl config that issues with it."""

    dir: Path

    @property
    def cert(self) -> Path:
        return self.dir / "cacert.pem"

    @property
    def key(self) -> Path:
        return self.dir / "cakey.pem"

    @property
    def config(self) -> Path:
        return self.dir / "openssl.cnf"


def openssl_req(config: Path, section: str, subject: str, key: Path, cert: Path) -> list[str]:
    """`openssl req` that makes a fresh key and a certificate with `section`'s extensions.

    Shared by the TLS certificates here and the message-signing identity (lab/signing.py).
    """
    return [
        "openssl",
        "req",
        "-config",
        str(config),
        "-x509",
        "-new",
        "-newkey",
        f"rsa:{RSA_BITS}",
        "-noenc",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-subj",
        subject,
        "-days",
        str(VALID_DAYS),
        "-extensions",
        section,
    ]


def create_ca(lab: LabLayout) -> CertificateAuthority:
    """A new self-signed CA in the lab's directory (root only; `down` removes it)."""
    ca = CertificateAuthority(lab.ca_dir)
    ca.dir.mkdir(parents=True, exist_ok=True)
    ca.dir.chmod(0o700)
    ca.config.write_text(OPENSSL_CONF)
    run(openssl_req(ca.config, "ca", f"/CN=drover lab {lab.lab_id} CA", ca.key, ca.cert))
    ca.key.chmod(0o600)
    return ca


def _install(source: Path, target: Path, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)


def issue_host_certificates(ca: CertificateAuthority, host: HostLayout) -> None:
    """Give `host` the CA and its own server and client pairs, for libvirt and for QEMU."""
    issued = ca.dir / host.name
    issued.mkdir(exist_ok=True)
    files = {("ca", "cert"): ca.cert}
    for role in ("server", "client"):
        key, cert = issued / f"{role}key.pem", issued / f"{role}cert.pem"
        argv = openssl_req(ca.config, role, f"/CN={host.address}", key, cert)
        signed = ["-CA", str(ca.cert), "-CAkey", str(ca.key)]
        run([*argv, *signed, "-addext", f"subjectAltName=IP:{host.address},DNS:{host.name}"])
        files[(role, "cert")], files[(role, "key")] = cert, key
    pki = host.own_dir(PKI_DIR)
    qemu_dir = pki / Path(QEMU_CERT_DIR).relative_to(PKI_DIR)
    for (role, part), source in files.items():
        mode = 0o600 if part == "key" else 0o644
        _install(source, pki / LIBVIRT_FILES[(role, part)], mode)
        _install(source, qemu_dir / QEMU_FILES[(role, part)], mode)
