"""Whether this host can take part in a QEMU-TLS migration (`--tls`): its certificates are in
place.

QEMU's migration TLS reads its x509 files from the directory qemu.conf names
(`migrate_tls_x509_cert_dir`, else `default_tls_x509_cert_dir`, else libvirt's default
/etc/pki/qemu). A destination without a server certificate and key there, or a source without
the CA certificate that checks the destination's, fails the migration only after QEMU has
started on the destination. So the worker publishes the destination's side among its facts
(the evacuation planner leaves such a host out of a `--tls` drain, worker/fleet_view.py), and
each side's pre-check refuses a `--tls` job it cannot take part in (a dry run says so too).
libvirt offers no API that answers this; the files the daemon itself would open are the
closest evidence. Read on the worker, in the host's own mount namespace.
"""

from __future__ import annotations

import re
from pathlib import Path

from worker.tls_certs import certificate_problem

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DEFAULT_CERT_DIR = "/etc/pki/qemu"  # libvirt's built-in default_tls_x509_cert_dir
# What a TLS server (the migration's destination QEMU) needs: qemu.conf's documentation.
SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
# What the client (the source's QEMU) cannot do without: the CA that checks the server's
# certificate. Its own client-cert.pem and client-key.pem are optional to QEMU (a server that
# verifies clients refuses it then, which QEMU reports).
CLIENT_FILES = ("ca-cert.pem",)
_SETTING = re.compile(r'^\s*(migrate|default)_tls_x509_cert_dir\s*=\s*"([^"]*)"', re.MULTILINE)
TLS_REFUSAL = "no QEMU migration TLS certificates (--tls needs them on the destination)"


def migration_cert_dir(qemu_conf: str) -> str:
    """The directory QEMU's migration TLS reads, as `qemu_conf` (its text) sets it."""
    found = {key: value for key, value in _SETTING.findall(qemu_conf)}
    return found.get("migrate") or found.get("default") or DEFAULT_CERT_DIR


def _cert_dir(qemu_conf: Path) -> Path:
    try:
        text = qemu_conf.read_text()
    except OSError:
        text = ""  # no qemu.conf: libvirt's defaults
    return Path(migration_cert_dir(text))


def missing_files(files: tuple[str, ...], qemu_conf: Path = QEMU_CONF) -> tuple[Path, list[str]]:
    """The certificate directory, and which of `files` are not regular files in it."""
    cert_dir = _cert_dir(qemu_conf)
    return cert_dir, [name for name in files if not (cert_dir / name).is_file()]


def migration_tls_ready(qemu_conf: Path = QEMU_CONF) -> bool:
    """True when the files a migration TLS server needs are in its certificate directory and
    would serve QEMU (worker/tls_certs.py)."""
    return tls_refusal("", destination=True, qemu_conf=qemu_conf) is None


def tls_refusal(host: str, destination: bool, qemu_conf: Path = QEMU_CONF) -> str | None:
    """Why this host cannot take its side of a `--tls` migration (None: its files are there,
    and usable): the destination's QEMU is the TLS server, the source's the client."""
    cert_dir, missing = missing_files(SERVER_FILES if destination else CLIENT_FILES, qemu_conf)
    role = "server" if destination else "client"
    needed = f"--tls needs them on {'the destination' if destination else 'the source'}"
    if missing:
        return (
            f"{host}: no QEMU migration TLS {role} certificates: {', '.join(missing)} missing "
            f"in {cert_dir} ({needed})"
        )
    problem = certificate_problem(cert_dir, destination)
    if problem is None:
        return None
    return f"{host}: unusable QEMU migration TLS {role} files in {cert_dir}: {problem} ({needed})"
