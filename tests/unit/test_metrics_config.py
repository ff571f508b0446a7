"""Where a worker's exporter listens: the registry says, loopback by default, never on every
interface unless it says so in as many words; and the one `mode` word of a job's series."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import ConfigError, load_settings
from jobs.spec import MigrationSpec, migration_mode
from tests.support.cli import run_drover

HOST = """
[hosts.kvm1]
peer_uri = "qemu+tcp://192.0.2.1/system"
migration_address = "192.0.2.1"
"""


def registry(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "drover.toml"
    path.write_text(HOST + extra)
    return path


def test_the_exporter_listens_on_loopback_by_default(tmp_path: Path) -> None:
    host = load_settings(registry(tmp_path, "")).host("kvm1")
    assert (host.metrics_address, host.metrics_port, host.metrics_expose_all) == (
        "127.0.0.1",
        9641,
        False,
    )


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", "[::]"])
def test_every_interface_needs_expose_all(tmp_path: Path, wildcard: str) -> None:
    path = registry(tmp_path, f'metrics_address = "{wildcard}"\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(path)
    message = str(refused.value)
    assert "\n" not in message
    assert f"hosts.kvm1: metrics_address {wildcard} listens on every interface" in message
    assert "metrics_expose_all = true" in message

    allowed = registry(tmp_path, f'metrics_address = "{wildcard}"\nmetrics_expose_all = true\n')
    assert load_settings(allowed).host("kvm1").metrics_address == wildcard


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('metrics_address = "10.0.0.1:9641"', "not an IP address or host name"),
        ('metrics_address = "http://10.0.0.1"', "not an IP address or host name"),
        ("metrics_port = 70000", "metrics_port"),
        ("metrics_port = -1", "metrics_port"),
    ],
)
def test_bad_metrics_settings_are_one_line_refusals(
    tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        load_settings(registry(tmp_path, extra + "\n"))
    assert "\n" not in str(refused.value)


def test_a_worker_on_a_wildcard_without_expose_all_does_not_start(tmp_path: Path) -> None:
    path = registry(tmp_path, 'metrics_address = "0.0.0.0"\n[security]\ninsecure = true\n')
    result = run_drover(path, "worker", "--host", "kvm1")
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert "metrics_address 0.0.0.0 listens on every interface" in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("spec", "mode"),
    [
        ({}, "p2p-native"),
        ({"transport": "tunnelled"}, "p2p-tunnelled"),
        ({"control": "direct"}, "direct-native"),
        ({"control": "unmanaged"}, "unmanaged-native"),
        ({"offline": True, "live": False, "persistent": True}, "offline"),
    ],
)
def test_a_job_mode_is_one_word(spec: dict[str, object], mode: str) -> None:
    assert migration_mode(MigrationSpec(domain="vm1", src="a", dst="b", **spec)) == mode  # type: ignore[arg-type]
