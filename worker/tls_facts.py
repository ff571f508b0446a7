"""Whether this host can take a QEMU-TLS migration (`--tls`): its certificates are in place.

QEMU's migration TLS reads its x509 files from the directory qemu.conf names
(`migrate_tls_x509_cert_dir`, else `default_tls_x509_cert_dir`, else libvirt's default
/etc/pki/qemu). A destination without a server certificate and key there fails the migration
only after QEMU has started on it, so the worker publishes this among its facts and the
evacuation planner leaves such a host out of a `--tls` drain (worker/fleet_view.py).
libvirt offers no API that answers this; the files the daemon itself would open are the
closest evidence. Read on the worker, in the host's own mount namespace.
"""

from __future__ import annotations

import re
from pathlib import Path

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DEFAULT_CERT_DIR = "/etc/pki/qemu"  # libvirt's built-in default_tls_x509_cert_dir
# What a TLS server (the migration's destination QEMU) needs: qemu.conf's documentation.
SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
_SETTING = re.compile(r'^\s*(migrate|default)_tls_x509_cert_dir\s*=\s*"([^"]*)"', re.MULTILINE)
TLS_REFUSAL = "no QEMU migration TLS certificates (--tls needs them on the destination)"


def migration_cert_dir(qemu_conf: str) -> str:
    """The directory QEMU's migration TLS reads, as `qemu_conf` (its text) sets it."""
    found = {key: value for key, value in _SETTING.findall(qemu_conf)}
    return found.get("migrate") or found.get("default") or DEFAULT_CERT_DIR


def migration_tls_ready(qemu_conf: Path = QEMU_CONF) -> bool:
    """True when every file a migration TLS server needs is in its certificate directory."""
    try:
        text = qemu_conf.read_text()
    except OSError:
        text = ""  # no qemu.conf: libvirt's defaults
    cert_dir = Path(migration_cert_dir(text))
    return all((cert_dir / name).is_file() for name in SERVER_FILES)
