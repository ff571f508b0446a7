"""Configuration: the registry file, environment overrides, and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config.settings import ConfigError, load_settings

GOOD = """
redis_url = "redis://:pw@10.0.0.9:6379/0"

[hosts.kvm1]
libvirt_uri = "qemu:///system"
peer_uri = "qemu+tls://kvm1.example/system"
migration_address = "192.0.2.1"

[hosts.kvm1.limits]
memory_mib = 65536
max_outbound = 3

[hosts.kvm2]
peer_uri = "qemu+tls://kvm2.example/system"
migration_address = "192.0.2.2"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "drover.toml"
    path.write_text(text)
    return path


def test_registry_loads_hosts_by_table_name(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD))
    assert sorted(s.hosts) == ["kvm1", "kvm2"]
    assert s.host("kvm1").limits.memory_mib == 65536
    assert s.host("kvm1").limits.max_outbound == 3
    assert s.host("kvm2").libvirt_uri == "qemu:///system"
    assert s.host("kvm2").limits.max_inbound == 2


def test_environment_overrides_redis_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DROVER_REDIS_URL", "redis://127.0.0.1:7000/1")
    assert load_settings(write(tmp_path, GOOD)).redis_url == "redis://127.0.0.1:7000/1"


def test_config_path_comes_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DROVER_CONFIG", str(write(tmp_path, GOOD)))
    assert "kvm1" in load_settings().hosts


def test_unknown_host_names_the_known_ones(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match=r"unknown host 'kvm9' \(known hosts: kvm1, kvm2\)"):
        s.host("kvm9")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("redis_url = ", "not valid TOML"),
        ("[hosts.kvm1]\nmigration_address='x'\n", "hosts.kvm1.peer_uri: Field required"),
        (
            "[hosts.kvm1]\npeer_uri='qemu:///system'\nmigration_address='b'\ncolour='red'\n",
            "colour",
        ),
        (
            "[hosts.kvm1]\npeer_uri='qemu:///system'\nmigration_address='b'\n"
            "[hosts.kvm1.limits]\n"
            "max_outbound=0\n",
            "max_outbound",
        ),
        ("[hosts.kvm1]\nname='other'\npeer_uri='a'\nmigration_address='b'\n", "must match"),
        ("redis_url = 'http://:secret@x/'\n", "redis_url must start with redis://"),
        ("hosts = 3\n", "'hosts' must be a table"),
    ],
)
def test_malformed_files_give_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)
    assert "secret" not in str(exc.value)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "nope.toml")


def test_a_config_that_is_no_file_or_no_text_is_one_line(tmp_path: Path) -> None:
    """A directory, a FIFO (which would block) or bytes that are not UTF-8: a ConfigError
    naming the file and why, never an OSError or UnicodeDecodeError."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    for path, why in (
        (tmp_path, "is a directory"),
        (fifo, "is a FIFO, not a regular file"),
        (binary, "not UTF-8 text"),
    ):
        with pytest.raises(ConfigError) as exc:
            load_settings(path)
        assert str(exc.value) == f"config file {path}: {why}"


def test_an_empty_config_path_is_refused_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty --config or $DROVER_CONFIG would have fallen through to ./drover.toml."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, GOOD)  # ./drover.toml: what an empty path used to load
    with pytest.raises(ConfigError, match="the config file path is empty"):
        load_settings("")
    monkeypatch.setenv("DROVER_CONFIG", "")
    with pytest.raises(ConfigError, match=r"\$DROVER_CONFIG is set but empty"):
        load_settings()


@pytest.mark.parametrize(
    ("table", "line", "message"),
    [
        ("hosts.kvm2", "metrics_expose_all = 'yes'", "valid boolean, not 'yes'"),
        ("hosts.kvm2", "metrics_expose_all = 1", "valid boolean, not 1"),
        ("hosts.kvm2.limits", "max_outbound = '3'", "valid integer, not '3'"),
        ("hosts.kvm2.limits", "memory_mib = 65536.0", "valid integer, not 65536.0"),
        ("hosts.kvm2.limits", "max_inbound = true", "valid integer, not True"),
        ("hosts.kvm2", "storage_dirs = '/srv/images'", "valid array, not '/srv/images'"),
        ("security", "signing = 'false'", "valid boolean, not 'false'"),
        ("policies.slow", "auto_converge = 'true'", "valid boolean, not 'true'"),
        ("policies.slow", "bandwidth_mib = '100'", "valid integer, not '100'"),
        ("tunables", "message_ttl = '60'", "valid number, not '60'"),
        ("hosts.kvm2", "policy = 5", "valid string, not 5"),
        ("hosts.kvm2", f"metrics_port = '{'9' * 500}'", "valid integer, not '999"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_converted(
    tmp_path: Path, table: str, line: str, message: str
) -> None:
    """pydantic's lax mode used to read "yes" or 1 as true, "700" as 700 and 65536.0 as
    65536: a setting the operator did not write. The file's values are now taken only as
    the TOML types they are, and the error quotes what the file has (shortened)."""
    header = "" if table == "hosts.kvm2" else f"[{table}]\n"  # GOOD ends in that table
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, f"{GOOD}{header}{line}\n"))
    text = str(caught.value)
    assert f"{table}.{line.split('=')[0].strip()}: Input should be a " in text, text
    assert message in text, text
    assert "\n" not in text and len(text) < 300, text


def test_strings_still_name_paths_enums_and_numbers_still_widen(tmp_path: Path) -> None:
    """What JSON-strict validation keeps: a string for an enum, a path or a literal, an
    integer for a float (TOML writes 60 for sixty seconds), a list for a tuple."""
    text = (
        f"{GOOD}\n[hosts.kvm2.limits]\nmemory_mib = 4096\n"
        "[policies.slow]\ncompression = 'xbzrle'\nactions = ['suspend', 'abort']\n"
        "progress_timeout_s = 60\n"
        "[tunables]\nmessage_ttl = 120\n"
        "[security]\ndigest = 'sha512'\n"
    )
    s = load_settings(write(tmp_path, text))
    policy = s.policies["slow"]
    assert policy.compression.value == "xbzrle"
    assert [a.value for a in policy.actions] == ["suspend", "abort"]
    assert policy.progress_timeout_s == 60.0
    assert s.tunables.message_ttl == 120.0
    assert s.security.digest == "sha512"
    assert s.host("kvm2").limits.memory_mib == 4096


def test_a_toml_date_is_no_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="1979-05-27 is a TOML date or time; no setting"):
        load_settings(write(tmp_path, f"{GOOD}\n[tunables]\nmessage_ttl = 1979-05-27\n"))
