"""The lab's Linux guest moved by drover in every mode while it answers ping and writes its disk.

One lab of its own (with TLS, so every mode works), one shared-storage guest moved back and
forth through the modes, and one local-disk guest moved with `--copy-storage all`. Each move
is checked through libvirt on both hosts and from inside the guest: it answered ping (the
longest gap is printed beside libvirt's downtime), the same boot's disk writer carried on
(counter grown, log without gaps, no write errors), and its file system checks clean after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from config.settings import load_settings
from lab import control, guest_probe
from lab.guest_move import GuestMove, move
from lab.layout import LabLayout
from lab.linux_domain import LOCAL, SHARED, LinuxGuest, local_path
from lab.proc import LabError
from lab.state import loaded
from producer.api import Drover
from tests.support.lab_fixtures import lab_id, view, wait_for

libvirt.registerErrorHandler(lambda *_: None, None)

# A lab id of its own, so the shared lab (tests/support/lab_fixtures.py) can be up too.
LINUX_LAB_ID = lab_id(os.environ.get("DROVER_TEST_LINUX_LAB_ID", "7"))
# Far above what a healthy move shows (hundreds of ms under TCG), far below "lost it".
MAX_PING_GAP_S = 10.0

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

# mode -> the job's options (post-copy: switched by the operator once pre-copy copies), and
# the libvirt API and a flag its call must show
MODES: dict[str, tuple[dict[str, Any], str, str]] = {
    "native-p2p": ({}, "migrateToURI3", "VIR_MIGRATE_PEER2PEER"),
    "tunnelled-p2p": ({"transport": "tunnelled"}, "migrateToURI3", "VIR_MIGRATE_TUNNELLED"),
    "tls-p2p": ({"tls": True}, "migrateToURI3", "VIR_MIGRATE_TLS"),
    "managed-direct": ({"control": "direct"}, "migrate3", "VIR_MIGRATE_LIVE"),
    "postcopy": ({"postcopy": True}, "migrateToURI3", "VIR_MIGRATE_POSTCOPY"),
}


@dataclass
class LinuxLab:
    layout: LabLayout
    status: dict[str, Any]
    drover: Drover
    guests: dict[str, LinuxGuest]

    def uri(self, host: str) -> str:
        return str(self.status["hosts"][host]["operator_uri"])

    def guest(self, kind: str) -> LinuxGuest:
        return next(g for g in self.guests.values() if g.kind == kind)

    def running_on(self, name: str) -> list[str]:
        return [h for h in sorted(self.status["hosts"]) if view(self.uri(h), name).active]


@pytest.fixture(scope="module")
def linux_lab() -> Iterator[LinuxLab]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DROVER_LAB_ID", LINUX_LAB_ID)
        mp.delenv("DROVER_CONFIG", raising=False)
        control.down()
        try:
            state = control.up(2, tls=True, linux_guests=1, local_linux_guests=1)
            st = control.status()
            conn = libvirt.open(st["hosts"]["lab1"]["operator_uri"])
            try:
                conn.lookupByName("dirty-1").suspend()  # it would burn a core
            finally:
                conn.close()
            yield LinuxLab(
                LabLayout.from_env(),
                st,
                Drover(load_settings(state.config)),
                {g.name: g for g in state.linux_guests},
            )
        finally:
            control.down()
        assert_nothing_left(LabLayout.from_env())


def assert_nothing_left(layout: LabLayout) -> None:
    """`lab down` removed the guest network's links and stopped the shared storage."""
    links = {p.name for p in Path("/sys/class/net").iterdir()}
    assert not {n for n in links if n.startswith(f"{layout.tag}g")}, links
    assert not (layout.dir / "gluster").exists()
    mine = str(layout.dir / "gluster")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            assert mine not in cmdline, f"pid {proc.name} still runs: {cmdline}"


# Where a guest kernel's report of a crash begins, in its console.
OOPS_MARKS = ("BUG:", "Oops:", "general protection fault", "invalid opcode", "Kernel panic")
OOPS_LINES_SHOWN = 80


def console_tail(lab: LinuxLab, host: str, name: str, lines: int = 25) -> str:
    """The end of the guest's serial console as `host` wrote it: a panic says why a guest
    came up again after a move. From the first line of the last crash report when there is
    one (its head names the fault), else the last `lines`."""
    own = lab.layout.host(int(host.removeprefix("lab"))).own_dir("/var/log/libvirt")
    path = own / "qemu" / f"{name}.console.log"
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no console log: {exc})"
    marks = [i for i, line in enumerate(text) if any(m in line for m in OOPS_MARKS)]
    if marks:  # the last report's first mark: the earliest within a report's length of it
        first = min(i for i in marks if i >= marks[-1] - OOPS_LINES_SHOWN)
        return "\n".join(text[max(first - 2, 0) : first + OOPS_LINES_SHOWN])
    return "\n".join(text[-lines:])


def moved(lab: LinuxLab, guest: LinuxGuest, src: str, dst: str, **opts: Any) -> GuestMove:
    """`move`, failing with the end of `dst`'s console when the guest's agent does not answer:
    a guest that panicked after the move and came up again refuses the agent's port for a
    moment (its network starts before its agent), which only the console explains."""
    try:
        return move(lab.drover, guest.name, guest.address, src, dst, **opts)
    except LabError as exc:
        tail = console_tail(lab, dst, guest.name)
        raise AssertionError(f"{exc}; {dst}'s console ends:\n{tail}") from None


def assert_moved(lab: LinuxLab, name: str, src: str, dst: str, m: GuestMove) -> None:
    assert m.job.state.value == "succeeded", m.job.reason
    there, here = view(lab.uri(dst), name), view(lab.uri(src), name)
    assert there.active and there.state == libvirt.VIR_DOMAIN_RUNNING
    assert not here.active
    problems = m.continuity_problems()
    assert problems == [], f"{problems} ({m.job.id}); {dst}'s console ends:\n" + console_tail(
        lab, dst, name
    )
    assert m.ping.received > 0
    assert m.ping.longest_gap_s < MAX_PING_GAP_S


def test_status_lists_each_linux_guest_with_its_address(linux_lab: LinuxLab) -> None:
    listed = {g["name"]: g for g in control.status()["linux_guests"]}
    assert set(listed) == {"linux-1", "linux-local-1"}
    for g in linux_lab.guests.values():
        assert listed[g.name]["address"] == g.address and listed[g.name]["kind"] == g.kind
        # reachable from the root namespace, its writer writing
        assert guest_probe.status(g.address).counter > 0


def test_the_linux_guest_moves_in_every_mode_answering_ping_and_writing(
    linux_lab: LinuxLab,
) -> None:
    guest = linux_lab.guest(SHARED)
    src, dst = "lab1", "lab2"
    assert linux_lab.running_on(guest.name) == [src]
    lines = []
    for mode, (opts, api, flag) in MODES.items():
        m = moved(linux_lab, guest, src, dst, **opts)
        try:
            assert_moved(linux_lab, guest.name, src, dst, m)
        except AssertionError as exc:
            raise AssertionError(f"moving {guest.name} {src}->{dst} ({mode}): {exc}") from None
        calls = [
            e["call"]
            for e in linux_lab.drover.events(m.job.id)
            if e["event"] == "migration.started"
        ]
        assert len(calls) == 1 and calls[0]["api"] == api and flag in calls[0]["flags"], calls
        if mode == "postcopy":
            assert m.job.result.mode == "postcopy"
        lines.append(
            f"{mode:15} {src}->{dst}  longest ping gap {m.longest_gap_ms:7.1f} ms  "
            f"libvirt downtime {m.downtime_ms} ms  lost {m.ping.lost}/{m.ping.sent}"
        )
        src, dst = dst, src
    print("\n" + "\n".join(lines))
    rc, out = guest_probe.fsck(guest.address)
    assert rc == 0, out
    assert guest_probe.status(guest.address).writer  # the writer carries on after the check


def test_the_local_disk_guest_without_copy_storage_is_refused_and_left_alone(
    linux_lab: LinuxLab,
) -> None:
    # Its disk is on lab1's own storage: libvirt (or drover's pre-check) refuses to move only
    # its memory ("Migration without shared storage is unsafe"); nothing passes UNSAFE.
    guest = linux_lab.guest(LOCAL)
    m = moved(linux_lab, guest, "lab1", "lab2")
    assert m.job.state.value == "failed"
    print(f"\nrefused: {m.job.reason}")
    assert linux_lab.running_on(guest.name) == ["lab1"]
    assert not view(linux_lab.uri("lab2"), guest.name).exists
    after = guest_probe.status(guest.address)
    assert after.boot_id == m.before.boot_id and after.counter > m.before.counter


def test_the_local_disk_guest_moves_with_copy_storage_and_keeps_its_disk(
    linux_lab: LinuxLab,
) -> None:
    guest = linux_lab.guest(LOCAL)
    m = moved(linux_lab, guest, "lab1", "lab2", copy_storage="all")
    assert_moved(linux_lab, guest.name, "lab1", "lab2", m)
    assert m.job.handoff.created_images == [guest.disk]
    assert local_path(guest, linux_lab.layout.host(2)).exists()
    # The log came along whole: every line from 1 up, nothing lost in the copy.
    assert m.after.lines >= m.before.counter and m.after.gaps == 0
    rc, out = guest_probe.fsck(guest.address)
    assert rc == 0, out


@pytest.mark.timeout(600)
def test_evacuate_with_copy_storage_drains_the_local_disk_guest(linux_lab: LinuxLab) -> None:
    """`drover evacuate HOST --copy-storage all --wait` moves the local-disk guest's disk too,
    and the shared-disk guest without a copy."""
    guest, shared = linux_lab.guest(LOCAL), linux_lab.guest(SHARED)
    src, dst = "lab2", "lab1"
    # Setup through drover: both Linux guests on the host to drain, wherever earlier tests
    # left them. The drain copies the local disk and must not copy the shared one (every host
    # sees it already: a copy would land on the image itself).
    if linux_lab.running_on(guest.name) == [dst]:
        m = moved(linux_lab, guest, dst, src, copy_storage="all")
        assert_moved(linux_lab, guest.name, dst, src, m)
    if linux_lab.running_on(shared.name) == [dst]:
        m = moved(linux_lab, shared, dst, src)
        assert_moved(linux_lab, shared.name, dst, src, m)
    assert linux_lab.running_on(guest.name) == [src]
    assert linux_lab.running_on(shared.name) == [src]
    # The image a move off `dst` left behind there (drover removes only what it made, and a
    # copy never overwrites a path): the guest runs on `src` from its own copy, as libvirt
    # shows, so the operator clears the stale one, as before any move back.
    local_path(guest, linux_lab.layout.host(1)).unlink(missing_ok=True)
    before = guest_probe.status(guest.address)
    shared_before = guest_probe.status(shared.address)
    config = loaded()[1].config
    result = subprocess.run(
        [sys.executable, "-m", "cli", "evacuate", src, "--copy-storage", "all", "--wait", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "DROVER_CONFIG": config},
        timeout=300,
        check=False,
    )
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        print(f"\n{result.stdout.strip()}")
        there, here = view(linux_lab.uri(dst), guest.name), view(linux_lab.uri(src), guest.name)
        assert there.active and there.state == libvirt.VIR_DOMAIN_RUNNING
        assert not here.active
        assert linux_lab.running_on(shared.name) == [dst]
        children = json.loads(result.stdout)["children"]  # domain -> its migration job
        copies = {d: linux_lab.drover.job(j).spec.copy_storage for d, j in children.items()}
        assert copies.get(guest.name) == "all" and copies.get(shared.name) is None, copies
        shared_after = guest_probe.status(shared.address)
        assert shared_after.boot_id == shared_before.boot_id and shared_after.gaps == 0
        assert local_path(guest, linux_lab.layout.host(1)).exists()
        after = guest_probe.status(guest.address)
        assert after.boot_id == before.boot_id and after.writer
        assert after.counter > before.counter
        # The log came along whole and carries on: every line from 1 up, no write errors.
        assert after.lines >= before.counter and after.gaps == 0 and after.write_errors == 0
        rc, out = guest_probe.fsck(guest.address)
        assert rc == 0, out
        wait_for(
            lambda: guest_probe.status(guest.address).counter > after.counter,
            30,
            "the disk writer to carry on after the check",
        )
    finally:
        linux_lab.drover.set_host_enabled(src, True)  # an evacuation leaves it disabled
