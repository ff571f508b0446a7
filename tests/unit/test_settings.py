"""Configuration: the registry file, environment overrides, and one-line errors."""

from __future__ import annotations

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
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
