"""Tests for lab.kernel: build the dirty guest, boot it in TCG QEMU, watch it count.

No mocks: the boot test assembles the real kernel with binutils, runs a real
qemu-system-x86_64 and reads the pass counter over the real HMP monitor socket,
exactly as the migration lab will.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lab.kernel import (
    GUEST_MEMORY_MIB,
    PASS_COUNTER_ADDR,
    build_dirty_kernel,
    parse_pass_counter,
    read_pass_counter_hmp_command,
)

QEMU = "qemu-system-x86_64"
BOOT_DEADLINE_S = 30.0
MIN_PASSES = 10
HMP_PROMPT = b"(qemu) "


def test_parse_pass_counter_plain_and_raw_socket_output() -> None:
    addr = f"{PASS_COUNTER_ADDR:016x}"
    assert parse_pass_counter(f"{addr}: 0x0000002a\n") == 42
    # What the monitor socket really sends: echoed input with cursor escapes,
    # CRLF line ends and the next prompt.
    raw = f"xp /1wx {PASS_COUNTER_ADDR:#x}\x1b[K\r\n{addr}: 0xdeadbeef\r\n(qemu) "
    assert parse_pass_counter(raw) == 0xDEADBEEF
    assert read_pass_counter_hmp_command() == f"xp /1wx {PASS_COUNTER_ADDR:#x}"


def test_parse_pass_counter_rejects_other_output() -> None:
    with pytest.raises(ValueError):
        parse_pass_counter("unknown command: 'xpp'\r\n(qemu) ")
    with pytest.raises(ValueError):
        parse_pass_counter(f"{PASS_COUNTER_ADDR + 4:016x}: 0x00000001\n")


def test_build_is_cached_until_source_changes(tmp_path: Path) -> None:
    elf = build_dirty_kernel(tmp_path)
    assert elf.read_bytes()[:4] == b"\x7fELF"
    first_mtime = elf.stat().st_mtime_ns
    assert build_dirty_kernel(tmp_path).stat().st_mtime_ns == first_mtime
    assert not [p for p in tmp_path.iterdir() if p != elf], "build left temp files behind"


def test_build_without_binutils_names_the_tool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    with pytest.raises(RuntimeError, match=r"'as' not found.*binutils"):
        build_dirty_kernel(tmp_path / "out")


class _Hmp:
    """Minimal HMP client: one command in, text up to the next prompt out."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._read_to_prompt()  # discard the banner

    def run(self, command: str) -> str:
        self._sock.sendall(command.encode() + b"\n")
        return self._read_to_prompt().decode(errors="replace")

    def _read_to_prompt(self) -> bytes:
        buf = b""
        while not buf.endswith(HMP_PROMPT):
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"HMP monitor did not answer before the deadline; got {buf!r}")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(4096)
            if not chunk:
                pytest.fail(f"HMP monitor closed the connection; got {buf!r}")
            buf += chunk
        return buf


def _pause_unless_exited(proc: subprocess.Popen[bytes], seconds: float, stderr: Path) -> None:
    """Wait up to `seconds` for QEMU to exit; fail at once if it did (so no blind sleeping)."""
    try:
        rc = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return
    pytest.fail(f"QEMU exited early (rc={rc}): {stderr.read_text(errors='replace').strip()}")


@contextmanager
def _hmp_session(
    path: Path, proc: subprocess.Popen[bytes], deadline: float, stderr: Path
) -> Iterator[_Hmp]:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                pytest.fail(f"HMP socket {path} never became connectable")
            _pause_unless_exited(proc, 0.05, stderr)
    with sock:
        yield _Hmp(sock, deadline)


@contextmanager
def _short_dir(tmp_path: Path) -> Iterator[Path]:
    """AF_UNIX paths max out near 108 bytes; pytest's tmp_path can be longer."""
    if len(str(tmp_path / "mon.sock")) < 100:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="drover-") as short:
        yield Path(short)


@pytest.mark.lab  # boots QEMU
@pytest.mark.timeout(60)
def test_dirty_kernel_boots_and_counts_passes(tmp_path: Path) -> None:
    elf = build_dirty_kernel(tmp_path / "build")
    serial_log = tmp_path / "serial.log"
    stderr_log = tmp_path / "qemu.stderr"
    command = read_pass_counter_hmp_command()

    with _short_dir(tmp_path) as sock_dir, stderr_log.open("wb") as qemu_out:
        mon_sock = sock_dir / "mon.sock"
        # fmt: off
        qemu_argv = [
            QEMU,
            "-machine", "pc",
            "-cpu", "qemu64",
            "-m", str(GUEST_MEMORY_MIB),
            "-accel", "tcg",
            "-display", "none",
            "-nodefaults",
            "-no-reboot",  # a triple fault ends the test instead of boot-looping
            "-kernel", str(elf),
            "-serial", f"file:{serial_log}",
            "-monitor", f"unix:{mon_sock},server=on,wait=off",
        ]
        # fmt: on
        proc = subprocess.Popen(
            qemu_argv,
            stdin=subprocess.DEVNULL,
            stdout=qemu_out,
            stderr=qemu_out,
        )
        try:
            deadline = time.monotonic() + BOOT_DEADLINE_S
            with _hmp_session(mon_sock, proc, deadline, stderr_log) as hmp:
                first = parse_pass_counter(hmp.run(command))
                latest = first
                while latest - first < MIN_PASSES and time.monotonic() < deadline:
                    _pause_unless_exited(proc, 0.1, stderr_log)
                    latest = parse_pass_counter(hmp.run(command))
        finally:
            proc.kill()
            proc.wait(timeout=10)

    assert latest - first >= MIN_PASSES, (
        f"pass counter went {first} -> {latest} in {BOOT_DEADLINE_S:.0f}s; guest not dirtying"
    )
    assert "dirty: start" in serial_log.read_text(errors="replace")
