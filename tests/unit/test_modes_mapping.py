"""Every mode of libvirt's migration guide maps to the right call; bad combinations refused."""

from __future__ import annotations

import libvirt
import pytest
from pydantic import ValidationError

from config.settings import Settings
from jobs.policy_choice import effective_policy
from jobs.record import Handoff
from jobs.spec import MigrationSpec, first_error
from worker.migration_call import MigrationCall, build_call, flag_names

HANDOFF = Handoff(
    dconnuri="qemu+tcp://10.0.0.2/system", migrate_uri="tcp://10.0.0.2", listen_address=None
)
URI = libvirt.VIR_MIGRATE_PARAM_URI


def call_of(s: MigrationSpec, handoff: Handoff) -> MigrationCall:
    """The call under the shipped `manual` policy (no post-copy unless asked for): the modes'
    own flags; what the default policy adds is tested in test_migration_call.py."""
    manual = s.model_copy(update={"policy": "manual"})
    return build_call(s, handoff, effective_policy(Settings(), manual).values)


def spec(**kw: object) -> MigrationSpec:
    return MigrationSpec.model_validate({"domain": "web01", "src": "a", "dst": "b", **kw})


# (spec options, api, dconnuri, opens destination connection, flags beyond LIVE, sends URI)
SCENARIOS = {
    "native-client-to-two-daemons": ({"control": "direct"}, "migrate3", None, True, set(), True),
    "native-client-and-p2p": (
        {"dest_connection": True},
        "migrate2",
        None,
        True,
        {"VIR_MIGRATE_PEER2PEER"},
        False,
    ),
    "tunnelled-client-and-p2p": (
        {"dest_connection": True, "transport": "tunnelled"},
        "migrate2",
        None,
        True,
        {"VIR_MIGRATE_PEER2PEER", "VIR_MIGRATE_TUNNELLED"},
        False,
    ),
    "native-client-to-one-daemon": (
        {"control": "unmanaged"},
        "migrateToURI3",
        None,
        False,
        set(),
        True,
    ),
    "native-p2p": (
        {},
        "migrateToURI3",
        "qemu+tcp://10.0.0.2/system",
        False,
        {"VIR_MIGRATE_PEER2PEER"},
        True,
    ),
    "tunnelled-p2p": (
        {"transport": "tunnelled"},
        "migrateToURI3",
        "qemu+tcp://10.0.0.2/system",
        False,
        {"VIR_MIGRATE_PEER2PEER", "VIR_MIGRATE_TUNNELLED"},
        False,
    ),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_each_scenario_maps_to_its_libvirt_call(name: str) -> None:
    options, api, dconnuri, dest_conn, extra_flags, sends_uri = SCENARIOS[name]
    s = spec(**options)
    handoff = (
        HANDOFF
        if s.transport.value == "native"
        else Handoff(dconnuri=HANDOFF.dconnuri, migrate_uri=None)
    )
    call = call_of(s, handoff)
    assert call.api == api
    assert call.dconnuri == dconnuri
    assert (call.dest_connection_uri == HANDOFF.dconnuri) is dest_conn
    assert set(flag_names(call.flags)) == {"VIR_MIGRATE_LIVE"} | extra_flags
    assert (URI in call.params) is sends_uri


def test_every_virsh_option_reaches_the_call() -> None:
    s = spec(
        persistent=True,
        undefine_source=True,
        suspend=True,
        dname="web02",
        change_protection=True,
        abort_on_error=True,
        auto_converge=True,
        compressed=True,
        bandwidth_mib=100,
        parallel=4,
        copy_storage="all",
        tls=True,
        migrate_uri="tcp://192.0.2.7:49999",
        listen_address="192.0.2.7",
    )
    call = call_of(
        s,
        Handoff(
            dconnuri="qemu+tls://h/system",
            migrate_uri=s.migrate_uri,
            listen_address=s.listen_address,
        ),
    )
    assert set(flag_names(call.flags)) == {
        "VIR_MIGRATE_LIVE",
        "VIR_MIGRATE_PEER2PEER",
        "VIR_MIGRATE_PERSIST_DEST",
        "VIR_MIGRATE_UNDEFINE_SOURCE",
        "VIR_MIGRATE_PAUSED",
        "VIR_MIGRATE_CHANGE_PROTECTION",
        "VIR_MIGRATE_ABORT_ON_ERROR",
        "VIR_MIGRATE_AUTO_CONVERGE",
        "VIR_MIGRATE_COMPRESSED",
        "VIR_MIGRATE_PARALLEL",
        "VIR_MIGRATE_NON_SHARED_DISK",
        "VIR_MIGRATE_TLS",
    }
    assert call.params == {
        URI: "tcp://192.0.2.7:49999",
        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "192.0.2.7",
        libvirt.VIR_MIGRATE_PARAM_DEST_NAME: "web02",
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 100,
        libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS: 4,
        libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL: 20,
        libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT: 10,
    }


def test_offline_and_incremental_storage_flags() -> None:
    offline = call_of(spec(live=False, offline=True, persistent=True), HANDOFF)
    assert set(flag_names(offline.flags)) == {
        "VIR_MIGRATE_OFFLINE",
        "VIR_MIGRATE_PERSIST_DEST",
        "VIR_MIGRATE_PEER2PEER",
    }
    inc = call_of(spec(copy_storage="inc"), HANDOFF)
    assert "VIR_MIGRATE_NON_SHARED_INC" in flag_names(inc.flags)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"control": "direct", "transport": "tunnelled"}, "--tunnelled needs peer-to-peer"),
        ({"control": "unmanaged", "transport": "tunnelled"}, "--tunnelled needs peer-to-peer"),
        ({"control": "direct", "dest_connection": True}, "goes with --p2p"),
        ({"offline": True, "persistent": True}, "--offline and --live exclude each other"),
        ({"live": False, "offline": True}, "needs --persistent"),
        (
            {"live": False, "offline": True, "persistent": True, "postcopy": True},
            "--postcopy does not apply to an offline migration",
        ),
        (
            {"live": False, "offline": True, "persistent": True, "copy_storage": "all"},
            "--copy-storage does not apply",
        ),
        ({"transport": "tunnelled", "postcopy": True}, "--postcopy cannot be tunnelled"),
        ({"transport": "tunnelled", "parallel": 2}, "--parallel cannot be tunnelled"),
        ({"transport": "tunnelled", "tls": True}, "--tls cannot be tunnelled"),
        ({"transport": "tunnelled", "migrate_uri": "tcp://10.0.0.1"}, "no effect when tunnelled"),
        ({"transport": "tunnelled", "listen_address": "10.0.0.1"}, "no effect when tunnelled"),
        ({"live": False, "postcopy": True}, "--postcopy needs --live"),
        ({"dest_connection": True, "migrate_uri": "tcp://10.0.0.1"}, "virDomainMigrate2"),
        ({"control": "unmanaged", "persistent": True}, "unmanaged migration"),
        ({"parallel": 1}, "parallel"),
        ({"parallel": 65}, "parallel"),
        ({"copy_storage": "some"}, "--copy-storage"),
        ({"dname": "bad/name"}, "invalid --dname"),
    ],
)
def test_bad_combinations_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        spec(**options)
    assert message in first_error(exc.value)


@pytest.mark.parametrize(
    "uri",
    [
        "tcp://10.0.0.2",
        "tcp://10.0.0.2:49152",
        "rdma://node2.example",
        "tcp://[fd00::2]:4000",
        "unix:///run/drover/mig.sock",
        "tcp://node-2.example.org/",
        "tcp://[fe80::1%eth0]:4444",
        "rdma://[fe80::2%br-mig.10]",
    ],
)
def test_strict_migration_uris_accepted(uri: str) -> None:
    assert spec(migrate_uri=uri).migrate_uri == uri


@pytest.mark.parametrize(
    "uri",
    [
        "ssh://10.0.0.2",
        "tcp://10.0.0.2?command=id",
        "tcp://user@10.0.0.2",
        "tcp://10.0.0.2:0",
        "tcp://10.0.0.2:99999",
        "unix:///run/../etc/shadow",
        "unix://relative",
        "tcp://",
        "tcp://10.0.0.2#frag",
        "qemu+ext:///system?command=/bin/sh",
        "tcp://a b",
        "TCP://x",
        "tcp://[10.0.0.1]",
        "tcp://[10.0.0.1]:4444",
        "tcp://[fe80::1%x y]",
        "tcp://[fe80::1%" + "e" * 300 + "]",
        "tcp://[fe80::1%eth0;id]",
        "tcp://[fe80::1%eth0/x]",
        "tcp://[fe80::1%]",
        "tcp://[fe80::1%0123456789abcdef]",  # 16 characters: no interface name is that long
        "tcp://h:\u0664\u0669",  # Arabic-Indic digits: `\d` would take them
        "tcp://h:\uff14\uff19",  # full-width digits
        "tcp://\u0661\u0660.0.0.1",
    ],
)
def test_loose_migration_uris_refused(uri: str) -> None:
    with pytest.raises(ValidationError) as exc:
        spec(migrate_uri=uri)
    assert "migrate_uri" in first_error(exc.value) or "migration URI" in first_error(exc.value)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("tcp://[10.0.0.1]", "brackets hold an IPv6 address only, not '[10.0.0.1]'"),
        ("tcp://[fe80::1%x y]", "IPv6 scope id 'x y' must be an interface name"),
        ("tcp://[fe80::1%" + "e" * 5000 + "]", "(5016 characters)"),
        ("tcp://h:\u0664\u0669", "must be tcp://HOST[:PORT]"),
    ],
)
def test_uri_refusals_say_why_in_one_short_line(uri: str, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        spec(migrate_uri=uri)
    said = first_error(exc.value)
    assert message in said
    assert "\n" not in said and len(said) < 400  # a 5,000-character value is not echoed whole


@pytest.mark.parametrize(
    "addr", ["0.0.0.0", "::", "10.0.0.1", "node2.example", "fe80::1%eth0", "[fd00::1]"]
)
def test_listen_addresses(addr: str) -> None:
    assert spec(listen_address=addr).listen_address == addr


@pytest.mark.parametrize(
    "addr",
    [
        "10.0.0.1:80",
        "x;rm",
        "-h",
        "a..b",
        "",
        "[10.0.0.1]",
        "[fd00::1",
        "fe80::1%x y",
        "fe80::1%eth0;id",
        "10.0.0.1%eth0",
        "\u0661\u0660.0.0.1",
    ],
)
def test_bad_listen_addresses(addr: str) -> None:
    with pytest.raises(ValidationError):
        spec(listen_address=addr)


# libvirt's C API behind each python binding name (MigrationCall.api).
C_API = {"migrate2": "virDomainMigrate2", "migrate3": "virDomainMigrate3"}


def test_the_dest_connection_help_names_the_api_it_uses() -> None:
    """`drover migrate --help` tells an operator which libvirt call --dest-connection makes."""
    from typer.main import get_command

    from cli.main import app

    api = C_API[call_of(spec(dest_connection=True), HANDOFF).api]
    migrate = get_command(app).commands["migrate"]
    option = next(p for p in migrate.params if "--dest-connection" in p.opts)
    assert api in option.help, option.help
    assert not (set(C_API.values()) - {api}) & set(option.help.split()), option.help
