"""What the operator's abort and the worker's drain ask of a running migration.

Apart from the policy (worker/convergence.py): these are not judgements of the migration's
figures but of who wants it to stop, and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jobs.spec import ControlFlow, MigrationSpec

ActionKind = Literal["continue", "abort", "cancel", "handover"]


@dataclass(frozen=True)
class Action:
    """What the drain or the operator's abort asks of a running migration."""

    kind: ActionKind  # cancel: the operator asked to abort
    reason: str = ""


CONTINUE = Action("continue")


def drain_action(spec: MigrationSpec, drained_s: float, drain_timeout_s: float) -> Action:
    """What a worker in warm shutdown does about a migration it drives, `drained_s` into the
    shutdown (0 while not draining): let it run until the drain timeout; then hand a
    peer-to-peer one over (libvirtd drives it without its client; the next worker of the
    host re-attaches to it), and abort any other, which cannot outlive its client."""
    if drained_s <= 0 or drained_s < drain_timeout_s:
        return CONTINUE
    waited = f"the worker is shutting down and its drain timeout ({drain_timeout_s:g}s) passed"
    if spec.control is ControlFlow.P2P:
        return Action("handover", f"{waited}; libvirtd carries the migration on")
    return Action("abort", f"{waited}; a {spec.control.value} migration cannot outlive it")
