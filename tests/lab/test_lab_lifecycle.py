"""`drover lab up/down`: real hosts come up in their own namespaces, and down leaves nothing.

Runs on its own lab id before the shared session lab exists (file order), so the two labs
never compete for the two cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import control
from lab.layout import LabLayout
from lab.proc import LabError
from tests.support.lab_fixtures import lab_id, wait_for

pytestmark = pytest.mark.lab

LIFECYCLE_LAB_ID = lab_id(8)


@pytest.fixture
def lifecycle_lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[LabLayout]:
    monkeypatch.setenv("DROVER_LAB_ID", LIFECYCLE_LAB_ID)
    lab = LabLayout.from_env()
    control.down()
    yield lab
    control.down()


def leftovers(lab: LabLayout) -> list[str]:
    """Everything of this lab still on the machine: namespaces, links, processes, mounts."""
    found = []
    if Path("/run/netns").exists():
        found += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(f"{lab.tag}-")]
    found += [f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(lab.tag)]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        zombie = stat.rsplit(")", 1)[1].split()[0] == "Z"
        if str(lab.dir) in cmdline and not zombie and int(pid) != os.getpid():
            found.append(f"process {pid}: {cmdline[:80]}")
    mounts = Path("/proc/self/mounts").read_text()
    found += [f"mount {line.split()[1]}" for line in mounts.splitlines() if str(lab.dir) in line]
    if lab.dir.exists():
        found.append(f"dir {lab.dir}")
    return found


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_up_builds_isolated_hosts_and_down_removes_everything(lifecycle_lab: LabLayout) -> None:
    state = control.up(2)
    status = control.status()
    assert set(status["hosts"]) == {"lab1", "lab2"}
    for name, host in status["hosts"].items():
        assert host["worker_alive"] and host["libvirtd_alive"]
        # The worker runs inside the host's own network namespace, not the root one.
        netns = state.hosts[name].netns
        assert netns_inode(host["worker_pid"]) == os.stat(f"/run/netns/{netns}").st_ino
        assert netns_inode(host["worker_pid"]) != netns_inode(os.getpid())
        assert (
            os.stat(f"/proc/{host['worker_pid']}/ns/mnt").st_ino
            != os.stat("/proc/self/ns/mnt").st_ino
        )
    doms = {d["name"]: d for d in status["hosts"]["lab1"]["domains"]}
    assert doms["idle-1"]["active"] and doms["idle-1"]["persistent"]
    assert doms["dirty-1"]["active"] and doms["dirty-1"]["persistent"]
    assert status["hosts"]["lab2"]["domains"] == []
    assert control.env_line() == f"export DROVER_CONFIG={lifecycle_lab.config_path}"
    with pytest.raises(LabError, match="already up"):
        control.up(2)

    control.down()
    assert leftovers(lifecycle_lab) == []
    assert control.status()["up"] is False


def test_down_cleans_up_after_an_up_that_was_killed(lifecycle_lab: LabLayout) -> None:
    env = {**os.environ, "DROVER_LAB_ID": LIFECYCLE_LAB_ID}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "lab", "up"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill it once the second host's libvirtd is starting: namespaces, mounts, daemons.
        wait_for(
            lambda: (lifecycle_lab.host(2).dir / "holder.pid").exists(),
            60,
            "the second host's namespace",
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert leftovers(lifecycle_lab), "nothing was up when the kill landed"
    result = subprocess.run(
        [sys.executable, "-m", "cli", "lab", "down"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    wait_for(lambda: leftovers(lifecycle_lab) == [], 10, "zombies to be reaped")


def test_failing_up_tears_itself_down(
    lifecycle_lab: LabLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_worker(*_: object) -> None:
        raise LabError("worker refused to start")

    monkeypatch.setattr(control, "start_worker", broken_worker)
    with pytest.raises(LabError, match="worker refused to start"):
        control.up(2)
    assert leftovers(lifecycle_lab) == []
