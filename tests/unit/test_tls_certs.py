"""`--tls` files that are there but would not serve QEMU are refused before anything moves,
with the file and the fault named (worker/tls_certs.py). Before, any file passed: a junk,
expired or mismatched one failed the migration after QEMU started on the destination."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.tls_files import DAY, NOW, Certs, key_pem, make_cert
from worker.tls_certs import certificate_problem
from worker.tls_facts import migration_tls_ready, tls_refusal


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def test_a_good_set_serves_both_sides(certs: Certs) -> None:
    assert certificate_problem(certs.dir, destination=True, now=NOW) is None
    assert certificate_problem(certs.dir, destination=False, now=NOW) is None
    assert tls_refusal("kvm2", destination=True, qemu_conf=certs.conf) is None
    assert migration_tls_ready(certs.conf)


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("ca-cert.pem", b"x", "ca-cert.pem is not a PEM certificate"),
        ("server-cert.pem", b"", "server-cert.pem is not a PEM certificate"),
        (
            "server-key.pem",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "server-key.pem is not a PEM private key",
        ),
    ],
)
def test_junk_in_a_file_is_named(certs: Certs, name: str, content: bytes, says: str) -> None:
    certs.write(name, content)
    assert certificate_problem(certs.dir, destination=True, now=NOW) == says
    said = tls_refusal("kvm2", destination=True, qemu_conf=certs.conf)
    assert said is not None and said.startswith("kvm2: unusable QEMU migration TLS server files")
    assert says in said and str(certs.dir) in said and "\n" not in said
    assert not migration_tls_ready(certs.conf)


def test_an_expired_or_not_yet_valid_certificate_is_refused_with_its_date(certs: Certs) -> None:
    ca = ("drover-ca", certs.ca_key)
    certs.write("server-cert.pem", make_cert("kvm2", certs.server_key, ca, end=NOW - DAY))
    said = certificate_problem(certs.dir, destination=True, now=NOW)
    assert said == f"server-cert.pem expired on {NOW - DAY:%Y-%m-%d %H:%M} UTC"
    certs.write("server-cert.pem", make_cert("kvm2", certs.server_key, ca, start=NOW + DAY))
    said = certificate_problem(certs.dir, destination=True, now=NOW)
    assert said == f"server-cert.pem is not valid before {NOW + DAY:%Y-%m-%d %H:%M} UTC"
    certs.write("ca-cert.pem", make_cert("drover-ca", certs.ca_key, end=NOW - DAY))
    said = certificate_problem(certs.dir, destination=False, now=NOW)
    assert said == f"ca-cert.pem expired on {NOW - DAY:%Y-%m-%d %H:%M} UTC"


def test_a_certificate_of_another_ca_or_another_key_is_refused(certs: Certs) -> None:
    other_ca = ec.generate_private_key(ec.SECP256R1())
    certs.write("server-cert.pem", make_cert("kvm2", certs.server_key, ("drover-ca", other_ca)))
    said = certificate_problem(certs.dir, destination=True, now=NOW)
    assert said == "server-cert.pem was not issued by the CA in ca-cert.pem"
    certs.write("server-cert.pem", make_cert("kvm2", certs.server_key, ("drover-ca", certs.ca_key)))
    certs.write("server-key.pem", key_pem(certs.client_key))  # another host's key
    said = certificate_problem(certs.dir, destination=True, now=NOW)
    assert said == "server-key.pem is not the key of server-cert.pem"


def test_a_ca_bundle_counts_any_valid_ca_in_it(certs: Certs) -> None:
    """A CA file holding the old CA (expired) and the new one: the new one serves."""
    old_key = ec.generate_private_key(ec.SECP256R1())
    old = make_cert("old-ca", old_key, end=NOW - DAY)
    certs.write("ca-cert.pem", old + make_cert("drover-ca", certs.ca_key))
    assert certificate_problem(certs.dir, destination=True, now=NOW) is None


def test_an_encrypted_key_is_left_to_qemu_and_its_secret(certs: Certs) -> None:
    certs.write("server-key.pem", key_pem(certs.client_key, password=b"s3cret"))
    assert certificate_problem(certs.dir, destination=True, now=NOW) is None


def test_the_source_judges_its_client_pair_only_when_it_has_one(certs: Certs) -> None:
    certs.write("client-key.pem", key_pem(certs.server_key))
    said = certificate_problem(certs.dir, destination=False, now=NOW)
    assert said == "client-key.pem is not the key of client-cert.pem"
    (certs.dir / "client-key.pem").unlink()
    said = certificate_problem(certs.dir, destination=False, now=NOW)
    assert said is not None and said.startswith("cannot read client-key.pem")
    (certs.dir / "client-cert.pem").unlink()
    for name in ("server-cert.pem", "server-key.pem"):
        certs.write(name, b"junk")  # the server's files are not the source's concern
    assert certificate_problem(certs.dir, destination=False, now=NOW) is None


def test_an_unreadable_file_is_said_in_one_line(certs: Certs) -> None:
    (certs.dir / "server-key.pem").unlink()
    (certs.dir / "server-key.pem").mkdir()
    said = certificate_problem(certs.dir, destination=True, now=NOW)
    assert said is not None and said.startswith("cannot read server-key.pem: ")
