"""--xml, --persistent-xml, --tls-destination, --disks-port, --disks-uri: each reaches its
libvirt parameter (tests/unit/test_modes_mapping.py's style), and bad combinations are refused
before anything is queued."""

from __future__ import annotations

import libvirt
import pytest
from pydantic import ValidationError

from config.settings import Host, Settings
from jobs.policy_choice import effective_policy
from jobs.record import Handoff
from jobs.spec import MigrationSpec, first_error
from worker.migration_call import UnsafeTarget, build_call, handoff_for

UUID = "6f1c2a0e-8f3b-4d7e-9a55-0c1d2e3f4a5b"
XML = f"<domain type='qemu'><name>web01</name><uuid>{UUID}</uuid></domain>"
RENAMED = XML.replace("web01", "web02")
HANDOFF = Handoff(dconnuri="qemu+tcp://10.0.0.2/system", migrate_uri="tcp://10.0.0.2")
DST = Host(
    name="b",
    peer_uri="qemu+tcp://10.0.0.2/system",
    migration_address="10.0.0.2",
    migration_socket_dir="/run/drover-migration",
)


def spec(**kw: object) -> MigrationSpec:
    return MigrationSpec.model_validate(
        {"domain": "web01", "src": "a", "dst": "b", "live": True, "policy": "manual", **kw}
    )


def params_of(s: MigrationSpec) -> dict[str, object]:
    return build_call(s, HANDOFF, effective_policy(Settings(), s).values).params


def test_each_option_reaches_its_libvirt_parameter() -> None:
    s = spec(
        dest_xml=XML,
        persist_xml=XML,
        persistent=True,
        tls=True,
        tls_destination="lab2.example",
        copy_storage="all",
        disks_port=49300,
    )
    params = params_of(s)
    assert params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] == XML
    assert params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] == XML
    assert params[libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION] == "lab2.example"
    assert params[libvirt.VIR_MIGRATE_PARAM_DISKS_PORT] == 49300
    assert libvirt.VIR_MIGRATE_PARAM_DISKS_URI not in params
    uri = spec(copy_storage="all", disks_uri="tcp://10.0.0.2:49301")
    assert params_of(uri)[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] == "tcp://10.0.0.2:49301"


def test_unset_options_send_no_parameter() -> None:
    params = params_of(spec())
    for name in ("DEST_XML", "PERSIST_XML", "TLS_DESTINATION", "DISKS_PORT", "DISKS_URI"):
        assert getattr(libvirt, f"VIR_MIGRATE_PARAM_{name}") not in params


def test_events_show_an_xml_as_its_digest_not_its_text() -> None:
    shown = build_call(
        spec(dest_xml=XML), HANDOFF, effective_policy(Settings(), spec()).values
    ).describe()
    value = shown["params"][libvirt.VIR_MIGRATE_PARAM_DEST_XML]
    assert value.startswith(f"{len(XML)} chars, sha256 ") and "<domain" not in value


def test_dest_connection_carries_the_xml_through_migrate2() -> None:
    s = spec(dest_xml=XML, dest_connection=True)
    call = build_call(s, HANDOFF, effective_policy(Settings(), s).values)
    assert call.api == "migrate2"
    assert call.params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] == XML


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dest_xml": RENAMED}, "--xml names the guest 'web02'; it must be 'web01'"),
        ({"dest_xml": XML, "dname": "web02"}, "--xml names the guest 'web01'; it must be 'web02'"),
        ({"dest_xml": "<domain"}, "--xml is not well-formed XML"),
        ({"dest_xml": "<domain><name>web01</name></domain>"}, "must carry the guest's <uuid>"),
        ({"persist_xml": XML}, "--persistent-xml needs --persistent"),
        (
            {"persist_xml": XML, "persistent": True, "dest_connection": True},
            "--persistent-xml cannot go through virDomainMigrate2",
        ),
        (
            {"dest_xml": XML, "offline": True, "live": False, "persistent": True, "policy": None},
            "an offline move takes --persistent-xml",
        ),
        ({"tls_destination": "lab2"}, "--tls-destination needs --tls"),
        ({"tls": True, "tls_destination": "lab2/x"}, "--tls-destination: not an IP address"),
        ({"disks_port": 49300}, "--disks-port needs --copy-storage"),
        ({"disks_uri": "tcp://10.0.0.2:1"}, "--disks-uri needs --copy-storage"),
        ({"copy_storage": "all", "disks_port": 80}, "--disks-port"),
        (
            {"copy_storage": "all", "disks_port": 49300, "disks_uri": "tcp://10.0.0.2:49301"},
            "--disks-port and --disks-uri exclude each other",
        ),
        ({"copy_storage": "all", "disks_uri": "rdma://10.0.0.2"}, "tcp://HOST[:PORT] or unix"),
        ({"copy_storage": "all", "disks_uri": "tcp://10.0.0.2:22"}, "port below 1024"),
        ({"copy_storage": "all", "disks_uri": "http://x"}, "--disks-uri: migration URI"),
        (
            {"copy_storage": "all", "transport": "tunnelled", "disks_port": 49300},
            "--disks-port has no effect when tunnelled",
        ),
    ],
)
def test_bad_combinations_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        spec(**options)
    assert message in first_error(exc.value)


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("tcp://10.0.0.2:49301", True),
        ("unix:///run/drover-migration/disks.sock", True),
        ("tcp://10.0.0.9:49301", False),
        ("unix:///etc/disks.sock", False),
    ],
)
def test_the_worker_sends_disks_only_to_the_destination(uri: str, ok: bool) -> None:
    s = spec(copy_storage="all", disks_uri=uri)
    if ok:
        handoff_for(s, DST)
        return
    with pytest.raises(UnsafeTarget, match=r"^--disks-uri "):
        handoff_for(s, DST)


@pytest.mark.parametrize(
    ("address", "ok"),
    [("10.0.0.2", True), ("10.0.0.9", False), ("0.0.0.0", False), ("b", False)],
)
def test_the_worker_has_the_destination_listen_only_where_the_source_connects(
    address: str, ok: bool
) -> None:
    """The producer checks --listen-address against the registry; the worker checks again
    where it uses it, as it does every address in the hand-off."""
    s = spec(listen_address=address)
    if ok:
        assert handoff_for(s, DST).listen_address == address
        return
    with pytest.raises(UnsafeTarget):
        handoff_for(s, DST)
