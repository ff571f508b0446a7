"""Running system commands for the lab, with failures turned into one-line errors."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class LabError(Exception):
    """Something the operator must fix or know; the message is one line."""


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60) -> str:
    """Run a command, return its stdout; on failure raise LabError with its stderr's last line."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise LabError(f"command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"timed out after {timeout:.0f}s: {' '.join(argv)}") from None
    if check and proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        last = lines[-1] if lines else f"exit {proc.returncode}"
        raise LabError(f"{' '.join(argv)}: {last}")
    return proc.stdout


def spawn(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start a long-lived process detached from us (own session), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    return proc.pid


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll `cond` until it holds; raise LabError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def kill(pids: Sequence[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not any(alive(p) for p in pids):
            return


def pid_from_file(path: Path) -> int:
    """The pid a daemon wrote to `path` (0 when there is none to read)."""
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0
