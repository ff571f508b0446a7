"""The registry's libvirt URIs are checked at load: allowed transports and parameters only."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import ConfigError, Settings, load_settings

REGISTRY = """{top}
[hosts.kvm1]
libvirt_uri = {libvirt_uri}
peer_uri = {peer_uri}
migration_address = {address}
"""


def toml_str(value: str) -> str:
    """`value` as a TOML basic string (escapes included, so control characters survive)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def load(
    tmp_path: Path,
    *,
    peer_uri: str = "qemu+tcp://192.0.2.1/system",
    libvirt_uri: str = "qemu:///system",
    address: str = "192.0.2.1",
    top: str = "",
) -> Settings:
    path = tmp_path / "drover.toml"
    path.write_text(
        REGISTRY.format(
            top=top,
            libvirt_uri=toml_str(libvirt_uri),
            peer_uri=toml_str(peer_uri),
            address=toml_str(address),
        )
    )
    return load_settings(path)


GOOD_URIS = [
    "qemu:///system",
    "qemu:///session",
    "qemu+unix:///system",
    "qemu+unix:///system?socket=/var/run/libvirt/libvirt-sock",
    "qemu:///system?socket=/run/libvirt/libvirt-sock",
    "qemu+tcp://192.0.2.1/system",
    "qemu+tcp://192.0.2.1:16509/system",
    "qemu+tls://kvm1.example.org/system",
    "qemu+tls://[fd00::1]:16514/system",
    "qemu+ssh://root@kvm1.example/system",
    "qemu+ssh://kvm1/system",
]


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_allowed_uris_load_as_written(tmp_path: Path, uri: str) -> None:
    """An allowed URI is what the worker and its peers then open: kept exactly, not rewritten."""
    host = load(tmp_path, peer_uri=uri, libvirt_uri=uri).host("kvm1")
    assert (host.libvirt_uri, host.peer_uri) == (uri, uri)


BAD_URIS = {
    "qemu+ext:///system?command=/bin/sh": "transport 'qemu+ext' is not allowed",
    "qemu+ssh://h/system?command=x": "parameter 'command' is not allowed",
    "qemu+ssh://h/system?netcat=/tmp/nc": "parameter 'netcat' is not allowed",
    "qemu+ssh://h/system?keyfile=/root/.ssh/id_rsa": "parameter 'keyfile' is not allowed",
    "qemu+ssh://h/system?known_hosts=/dev/null": "parameter 'known_hosts' is not allowed",
    "qemu+tcp://h/system?no_verify=1": "parameter 'no_verify' is not allowed",
    "qemu+tls://h/system?pkipath=/tmp/evil": "parameter 'pkipath' is not allowed",
    "qemu+tls://h/system?no_tty=1": "parameter 'no_tty' is not allowed",
    "qemu+libssh2://h/system": "transport 'qemu+libssh2' is not allowed",
    "qemu+libssh://h/system": "transport 'qemu+libssh' is not allowed",
    "xen:///system": "transport 'xen' is not allowed",
    "QEMU+TCP://h/system": "transport",
    "http://x": "transport 'http' is not allowed",
    "file:///etc/passwd": "transport 'file' is not allowed",
    "qemu+tcp:/h/system": "transport",
    "qemu+tcp://h/system?comm%61nd=x": "parameter 'command' is not allowed",
    "qemu+tcp://h/system?socket=/run/x": "socket= needs a local",
    "qemu+unix:///system?socket=../../etc/shadow": "socket must be an absolute path",
    "qemu+unix:///system?socket=/run/../etc/x": "socket must be an absolute path",
    "qemu+unix:///system?socket=/a&socket=/b": "repeated",
    "qemu+tcp://h/system?": "empty query",
    "qemu+tcp://h/system?x": "malformed query",
    "qemu+tcp://h/system#frag": "fragment",
    "qemu+tcp://h/system/extra": "path must be",
    "qemu+tcp://h/embed?root=/tmp": "path must be",
    "qemu+tcp://h": "path must be",
    "qemu+tcp://h:0/system": "port out of range",
    "qemu+tcp://h:70000/system": "port out of range",
    "qemu+tcp://h:/system": "port out of range",
    "qemu+tcp://-h/system": "not an IP address or DNS name",
    "qemu+tcp://h;id/system": "not an IP address or DNS name",
    "qemu+tcp://0x0a.0.0.2/system": "not an IP address or DNS name",  # resolved: 10.0.0.2
    "qemu+tcp://010.0.0.2/system": "not an IP address or DNS name",  # resolved: 8.0.0.2
    "qemu+tcp://[::1/system": "malformed host part",
    "qemu+tcp://[192.0.2.1]/system": "malformed host part",
    "qemu+tcp://[fe80::1%25x%20y]/system": "malformed host part",
    # urlsplit takes these brackets; check_address does not
    "qemu+tcp://[fe80::1%25eth0;id]/system": "not an IP address or DNS name",
    "qemu+tcp://[v1.fe80::a+en1]/system": "not an IP address or DNS name",
    "qemu+tls://user:hunter2@h/system": "no password",
    "qemu+unix://h/system": "a qemu+unix URI takes no host",
    "qemu+tcp://h/sys tem": "whitespace",
    " qemu+tcp://h/system": "whitespace",
    "qemu+tcp://h/system\n": "whitespace",
    "qemu+tcp://h/system\x00": "whitespace",
    "qemu+tcp://h\r\n/system": "whitespace",
    "qemu+tcp://hé/system": "non-ASCII",
    "": "1 to 512 characters",
    "qemu+tcp://" + "a" * 600 + "/system": "1 to 512 characters",
}


@pytest.mark.parametrize("uri", BAD_URIS)
@pytest.mark.parametrize("field", ["peer_uri", "libvirt_uri"])
def test_bad_uris_are_one_line_config_errors(tmp_path: Path, uri: str, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, **{field: uri})  # type: ignore[arg-type]
    message = str(exc.value)
    assert len(message.splitlines()) == 1
    assert f"hosts.kvm1.{field}" in message
    assert BAD_URIS[uri] in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "address", ["a b", "192.0.2.1:80", "-oProxyCommand=x", "h;id", "", "x\n", "tcp://h"]
)
def test_migration_address_must_be_an_address(tmp_path: Path, address: str) -> None:
    with pytest.raises(ConfigError, match=r"hosts\.kvm1\.migration_address: not an IP address"):
        load(tmp_path, address=address)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("[192.0.2.1]", "brackets hold an IPv6 address only"),
        ("fe80::1%x y", "IPv6 scope id 'x y' must be an interface name"),
        ("fe80::1%eth0;id", "IPv6 scope id 'eth0;id'"),
        ("\u0661\u0669\u0662.0.2.1", "not an IP address or host name"),
        ("010.0.0.1", "is written like a number"),  # the resolver's 8.0.0.1
        ("167772162", "is written like a number"),  # the resolver's 10.0.0.2
    ],
)
def test_migration_address_brackets_scopes_and_digits(
    tmp_path: Path, address: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=r"hosts\.kvm1\.migration_address: ") as exc:
        load(tmp_path, address=address)
    assert message in str(exc.value)


def test_a_link_local_migration_address_with_its_interface_loads(tmp_path: Path) -> None:
    assert load(tmp_path, address="fe80::1%eth1").host("kvm1").migration_address == "fe80::1%eth1"


def test_operator_can_replace_the_scheme_allowlist(tmp_path: Path) -> None:
    top = 'allowed_uri_schemes = ["qemu", "qemu+tls"]'
    load(tmp_path, peer_uri="qemu+tls://h/system", top=top)
    with pytest.raises(ConfigError, match="transport 'qemu\\+tcp' is not allowed"):
        load(tmp_path, peer_uri="qemu+tcp://h/system", top=top)


def test_operator_can_allow_a_parameter(tmp_path: Path) -> None:
    top = 'allowed_uri_params = ["socket", "pkipath"]'
    load(tmp_path, peer_uri="qemu+tls://h/system?pkipath=/etc/pki/drover", top=top)
    with pytest.raises(ConfigError, match="parameter 'pkipath' is not allowed"):
        load(tmp_path, peer_uri="qemu+tls://h/system?pkipath=/etc/pki/drover")


@pytest.mark.parametrize("top", ['allowed_uri_schemes = "qemu"', "allowed_uri_params = [1]"])
def test_allowlists_must_be_lists_of_names(tmp_path: Path, top: str) -> None:
    with pytest.raises(ConfigError, match="must be a list of names"):
        load(tmp_path, top=top)
