"""`lab up --tls`: libvirtd on qemu+tls:// and QEMU migration TLS, on a real lab of its own.

Migrations are driven straight through libvirt from the root namespace (operator URI of the
source, peer-to-peer toward the destination's qemu+tls:// URI), so this checks the lab's
certificates and configuration, not drover's job flow. drover's own jobs then
use every TLS-capable mode (tests/lab/test_modes.py shows `--tls` failing toward a host
without certificates).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from config.settings import load_settings
from lab import control
from lab.layout import LabLayout
from lab.proc import run
from producer.api import Drover
from tests.support.lab_fixtures import view, wait_for

libvirt.registerErrorHandler(lambda *_: None, None)

TLS_LAB_ID = "6"
TLS_PORT = 16514
SETTLE_S = 15.0
LIVE_P2P = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER

pytestmark = [pytest.mark.lab, pytest.mark.timeout(150)]


@pytest.fixture(scope="module")
def lab6() -> Iterator[LabLayout]:
    """Lab id 6 with TLS, shared by this module's tests; gone before and after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DROVER_LAB_ID", TLS_LAB_ID)
        mp.delenv("DROVER_CONFIG", raising=False)
        control.down()
        bring_up(tls=True)
        yield LabLayout.from_env()
        control.down()


def lab_hosts() -> dict[str, Any]:
    hosts: dict[str, Any] = control.status()["hosts"]
    return hosts


def bring_up(tls: bool) -> None:
    """Bring the lab up with dirty-1 paused, so it stops burning a core."""
    control.up(2, tls=tls)
    conn = libvirt.open(control.status()["hosts"]["lab1"]["operator_uri"])
    try:
        conn.lookupByName("dirty-1").suspend()
    finally:
        conn.close()


def listening(lab: LabLayout, host: str) -> set[str]:
    netns = lab.host(int(host.removeprefix("lab"))).netns
    out = run(["ip", "netns", "exec", netns, "ss", "-ltnH"])
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def migrate(hosts: dict[str, Any], src: str, dst: str, flags: int, **params: str) -> None:
    """Migrate idle-1 from `src` toward `dst`'s peer URI, as libvirt's client in the root ns."""
    conn = libvirt.open(hosts[src]["operator_uri"])
    try:
        conn.lookupByName("idle-1").migrateToURI3(hosts[dst]["peer_uri"], params, flags)
    finally:
        conn.close()


def assert_runs_only_on(hosts: dict[str, Any], where: str) -> None:
    def settled() -> bool:
        here = {h: view(hosts[h]["operator_uri"], "idle-1") for h in hosts}
        running = here[where].active and here[where].state == libvirt.VIR_DOMAIN_RUNNING
        return running and not any(v.active for h, v in here.items() if h != where)

    wait_for(settled, SETTLE_S, f"idle-1 running on {where} only")


def test_tls_lab_migrates_with_qemu_tls_and_tunnelled_over_libvirt_tls(lab6: LabLayout) -> None:
    hosts = lab_hosts()
    assert control.status()["tls"] is True
    lab2 = hosts["lab2"]["address"]
    assert hosts["lab2"]["peer_uri"] == f"qemu+tls://{lab2}/system"
    assert f'peer_uri = "qemu+tls://{lab2}/system"' in lab6.config_path.read_text()
    assert f"{lab2}:{TLS_PORT}" in listening(lab6, "lab2")

    # Native: libvirtd talks TLS to libvirtd, QEMU encrypts the migration stream itself.
    uri = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{lab2}"}
    migrate(hosts, "lab1", "lab2", LIVE_P2P | libvirt.VIR_MIGRATE_TLS, **uri)
    assert_runs_only_on(hosts, "lab2")
    assert view(hosts["lab1"]["operator_uri"], "idle-1").persistent  # the source keeps it

    # Tunnelled: the memory goes through the qemu+tls:// connection between the libvirtds.
    migrate(hosts, "lab2", "lab1", LIVE_P2P | libvirt.VIR_MIGRATE_TUNNELLED)
    assert_runs_only_on(hosts, "lab1")
    assert not view(hosts["lab2"]["operator_uri"], "idle-1").exists


@pytest.mark.parametrize(
    "options",
    [
        {"tls": True},
        {"transport": "tunnelled"},
        {"control": "direct", "tls": True},
        {"dest_connection": True, "tls": True},
    ],
    ids=["p2p-native-tls", "p2p-tunnelled-over-qemu+tls", "direct-native-tls", "migrate2-tls"],
)
def test_drover_jobs_over_tls(lab6: LabLayout, options: dict[str, Any]) -> None:
    hosts = lab_hosts()
    d = Drover(load_settings(lab6.config_path))
    for src, dst in (("lab1", "lab2"), ("lab2", "lab1")):
        job = d.wait(d.submit(domain="idle-1", src=src, dst=dst, live=True, **options), 120)
        assert job.state.value == "succeeded", job.reason
        assert job.handoff.dconnuri == hosts[dst]["peer_uri"]
        assert hosts[dst]["peer_uri"].startswith("qemu+tls://")
        assert_runs_only_on(hosts, dst)
