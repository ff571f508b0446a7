"""Asking a running migration's worker for a control the way an operator would: again, while
it says another change to the job's migration is still before libvirt.

A worker waits `tunables.control_lock_wait` (1 s) for the job's lock, held by the policy's own
step or another control while libvirt takes it, then refuses in one line ending "try again
in a moment" (worker/migration_control.py). Under load a libvirt call can take longer than
that, so a test that asks once fails on a refusal the tool tells its user to expect."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import TypeVar

from jobs.errors import SubmitError
from tests.support.lab_fixtures import wait_for

BUSY = "try again in a moment"
Answer = TypeVar("Answer", str, "subprocess.CompletedProcess[str]")


def when_free(ask: Callable[[], Answer], timeout: float) -> Answer:
    """`ask()`'s answer (a line, or a finished `drover` process), asked again with a deadline
    while it is that refusal; any other refusal is raised (or returned) as it came."""
    said: list[Answer] = []

    def taken() -> bool:
        try:
            answer = ask()
        except SubmitError as exc:
            if BUSY not in str(exc):
                raise
            return False
        if isinstance(answer, subprocess.CompletedProcess) and BUSY in answer.stderr:
            return False
        said.append(answer)
        return True

    wait_for(taken, timeout, "the worker to take the control")
    return said[0]
