"""`--tls` is judged before anything moves: the destination needs QEMU's migration server
certificates, the source the CA that checks them (worker/tls_facts.py). Before, a dry run
said yes on hosts without them, and the job failed once QEMU had started on the destination."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.spec import MigrationSpec
from tests.support.tls_files import Certs
from worker.precheck_source import source_checks
from worker.tls_facts import CLIENT_FILES, SERVER_FILES, tls_refusal

XML = "<domain type='qemu'><name>web</name><devices/></domain>"


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """A qemu.conf that names an empty certificate directory for migration TLS."""
    (tmp_path / "certs").mkdir()
    path = tmp_path / "qemu.conf"
    path.write_text(f'migrate_tls_x509_cert_dir = "{tmp_path / "certs"}"\n')
    return path


def test_the_destination_needs_every_server_file_and_says_which_are_missing(conf: Path) -> None:
    certs = conf.parent / "certs"
    said = tls_refusal("kvm2", destination=True, qemu_conf=conf)
    assert said is not None and said.startswith("kvm2: no QEMU migration TLS server")
    assert all(name in said for name in SERVER_FILES) and str(certs) in said
    (certs / "ca-cert.pem").write_text("x")
    (certs / "server-cert.pem").write_text("x")
    said = tls_refusal("kvm2", destination=True, qemu_conf=conf)
    assert said is not None and "server-key.pem missing" in said and "ca-cert" not in said
    (certs / "server-key.pem").mkdir()  # not a file: QEMU cannot read it as one
    assert tls_refusal("kvm2", destination=True, qemu_conf=conf) is not None
    (certs / "server-key.pem").rmdir()
    (certs / "server-key.pem").write_text("x")  # there, but no key: worker/tls_certs.py
    said = tls_refusal("kvm2", destination=True, qemu_conf=conf)
    assert said is not None and "ca-cert.pem is not a PEM certificate" in said
    Certs(conf.parent, exist_ok=True)
    assert tls_refusal("kvm2", destination=True, qemu_conf=conf) is None


def test_the_source_needs_the_ca_only(conf: Path) -> None:
    said = tls_refusal("kvm1", destination=False, qemu_conf=conf)
    assert said is not None and "client" in said and "ca-cert.pem missing" in said
    for name in CLIENT_FILES:
        (conf.parent / "certs" / name).write_text("x")
    said = tls_refusal("kvm1", destination=False, qemu_conf=conf)
    assert said is not None and "ca-cert.pem is not a PEM certificate" in said
    Certs(conf.parent, server=False, client=False, exist_ok=True)
    assert tls_refusal("kvm1", destination=False, qemu_conf=conf) is None


def test_no_qemu_conf_means_libvirts_default_directory(tmp_path: Path) -> None:
    said = tls_refusal("kvm2", destination=True, qemu_conf=tmp_path / "absent.conf")
    assert said is not None and "/etc/pki/qemu" in said


@pytest.mark.parametrize(
    ("spec", "checked"),
    [
        ({"live": True, "tls": True}, True),
        ({"live": True}, False),
    ],
)
def test_the_source_checks_tls_only_when_asked(spec: dict[str, object], checked: bool) -> None:
    s = MigrationSpec(domain="web", src="kvm1", dst="kvm2", unsafe=True, **spec)  # type: ignore[arg-type]
    names = [name for name, _ in source_checks(s, XML, lambda: "QEMU")]
    assert ("tls" in names) is checked
