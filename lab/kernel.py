"""Build and observe the lab's "memory-dirtying" guest kernel.

Why this exists: migration tests need a guest that keeps dirtying RAM at a
high, steady rate while pre-copy runs, boots in well under a second even
without KVM, and can prove it is still alive after the switch-over.  A real
OS image gives none of that cheaply.  ``guest/dirty.S`` is a few-KB multiboot
v1 kernel that rewrites a fixed 64 MiB region with xorshift32 words forever and
bumps a pass counter in guest RAM after every pass.  Tests read that counter
through the QEMU human monitor (HMP ``xp``) -- directly or via
``virsh qemu-monitor-command --hmp`` -- with the helpers below.

The addresses live here and are handed to the assembler with ``--defsym``, so
this module is the single source of truth for where the counter and the region
are.  Only GNU binutils (``as``/``ld``) is required; no C toolchain.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

_MIB: Final = 1024 * 1024

#: Guest-physical address of the 32-bit little-endian pass counter.  2 MiB is
#: above the kernel image (loaded at 1 MiB, a few KB) and the multiboot info
#: QEMU places right after it, and far below the dirty region.
PASS_COUNTER_ADDR: Final[int] = 0x0020_0000

#: Size of the region the guest rewrites on every pass.
DIRTY_REGION_MIB: Final = 64

#: Guest-physical start of that region (32 MiB .. 96 MiB).
DIRTY_REGION_BASE: Final[int] = 32 * _MIB

#: RAM the guest must be given for the region to fit (with headroom).
GUEST_MEMORY_MIB: Final = 128

#: Where the ELF is linked and loaded: the conventional 1 MiB mark, clear of
#: the real-mode IVT/BDA, VGA hole and BIOS ROM below it.
KERNEL_LOAD_ADDR: Final[int] = 0x0010_0000

#: The assembler source, shipped as package data (see pyproject.toml).
DIRTY_SOURCE: Final = Path(__file__).resolve().parent / "guest" / "dirty.S"

#: Name of the built kernel inside ``out_dir``.
DIRTY_ELF_NAME: Final = "dirty.elf"

# QEMU prints ``xp /1wx ADDR`` as "<16 hex digit address>: 0x<8 hex digits>".
_XP_LINE = re.compile(r"^\s*([0-9a-fA-F]+):\s+0x([0-9a-fA-F]{1,8})\s*$", re.MULTILINE)


def build_dirty_kernel(out_dir: Path) -> Path:
    """Assemble and link ``guest/dirty.S`` into ``out_dir/dirty.elf``.

    The ELF is rebuilt only when it is missing or older than its inputs (the
    ``.S`` file and this module, which supplies the addresses).  The result is
    written to a temporary name and renamed into place, so an interrupted or
    concurrent build never leaves a half-written kernel behind.

    Raises:
        RuntimeError: ``as``/``ld`` (GNU binutils) is missing, or a build
            step failed.  The message is one line naming the tool.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / DIRTY_ELF_NAME
    if _is_up_to_date(out, (DIRTY_SOURCE, Path(__file__).resolve())):
        return out

    assembler = _require_tool("as")
    linker = _require_tool("ld")
    defsyms = {
        "PASS_COUNTER_ADDR": PASS_COUNTER_ADDR,
        "DIRTY_REGION_BASE": DIRTY_REGION_BASE,
        "DIRTY_REGION_SIZE": DIRTY_REGION_MIB * _MIB,
    }
    with tempfile.TemporaryDirectory(prefix=".dirty-build-", dir=out_dir) as tmp:
        obj = Path(tmp) / "dirty.o"
        elf = Path(tmp) / DIRTY_ELF_NAME
        as_cmd = [assembler, "--32", "--fatal-warnings"]
        for name, value in defsyms.items():
            as_cmd += ["--defsym", f"{name}={value:#x}"]
        as_cmd += ["-o", str(obj), str(DIRTY_SOURCE)]
        _run("as", as_cmd)
        # -Ttext-segment puts the first PT_LOAD (ELF headers) at 1 MiB too;
        # plain -Ttext would load the headers at 0xff000, inside the BIOS area.
        _run(
            "ld",
            [
                linker,
                "-m",
                "elf_i386",
                f"-Ttext-segment={KERNEL_LOAD_ADDR:#x}",
                "-z",
                "max-page-size=0x1000",
                "-e",
                "_start",
                "--build-id=none",
                "-o",
                str(elf),
                str(obj),
            ],
        )
        os.replace(elf, out)
    return out


def read_pass_counter_hmp_command() -> str:
    """HMP command that prints the guest's pass counter (one 32-bit word, hex)."""
    return f"xp /1wx {PASS_COUNTER_ADDR:#x}"


def parse_pass_counter(hmp_output: str) -> int:
    """Extract the pass counter from the output of :func:`read_pass_counter_hmp_command`.

    QEMU answers with a line like ``0000000000200000: 0x0000002a``.  Raw
    monitor-socket output (terminal echo, ``\\r\\n``, ``(qemu)`` prompt) is
    accepted too; only the line for :data:`PASS_COUNTER_ADDR` is used.

    Raises:
        ValueError: no such line in ``hmp_output``.
    """
    for match in _XP_LINE.finditer(hmp_output):
        if int(match.group(1), 16) == PASS_COUNTER_ADDR:
            return int(match.group(2), 16)
    raise ValueError(
        f"no 'xp' line for address {PASS_COUNTER_ADDR:#x} in HMP output: {hmp_output!r}"
    )


def _is_up_to_date(target: Path, inputs: tuple[Path, ...]) -> bool:
    try:
        built = target.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(built >= src.stat().st_mtime_ns for src in inputs)


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"cannot build dirty kernel: '{name}' not found on PATH (install GNU binutils)"
        )
    return path


def _run(tool: str, cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise RuntimeError(
            f"cannot build dirty kernel: could not run '{tool}' ({exc}); install GNU binutils"
        ) from exc
    if proc.returncode != 0:
        # as/ld open with a "file: Assembler messages:" style header; the first
        # line that says "error" is the one worth a human's attention.
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        detail = next((line for line in lines if "error" in line.lower()), None)
        detail = detail or (lines[0] if lines else "no output")
        raise RuntimeError(
            f"cannot build dirty kernel: '{tool}' failed (exit {proc.returncode}): {detail}"
        )
