"""The options a drain applies to every child migration: what `drover migrate` offers that
makes sense for a whole host, shared by `drover evacuate` (jobs/evacuation_model.py) and
scheduled drains (schedules/records.py), so the two can never offer different sets.

Left out on purpose, as they name one guest or one call: `--dname`, `--migrate-uri`,
`--listen-address` (per destination, the registry's), `--dest-connection`, `--direct` and
`--unmanaged` (children are managed peer-to-peer), `--offline` / `--persistent` /
`--undefine-source` (decided per domain), `--suspend` (a drained guest should run on
arrival), `--postcopy` (the policy decides; `--timeout-action postcopy` asks for it).

How each applies to a child (`child_fields`): a live child carries them all; an offline one
(a defined-but-off domain moves only its definition) none. `--copy-storage` goes only to
children whose guest has local disks: a guest on shared storage has nothing to copy, and
libvirt cannot copy the disks of an inactive guest, which the plan leaves behind with why.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from config.policy_model import PolicyName
from jobs.compression import CompressionOptions
from jobs.spec import (
    MAX_BANDWIDTH_MIB,
    MAX_COMPLETION_TIMEOUT_S,
    MAX_PARALLEL_CONNECTIONS,
    STRICT,
    CopyStorage,
    TimeoutAction,
    Transport,
    lax,
)

OFFLINE_COPY_REFUSAL = (
    "has local disks and is not running: libvirt cannot copy the storage of an offline "
    "migration (--copy-storage)"
)


class DrainOptions(BaseModel):
    """Every child migration's options (see the module's docstring for what is left out);
    each value only as its own type, as MigrationSpec's (jobs/spec.py `STRICT`)."""

    model_config = STRICT

    tunnelled: bool = False
    auto_converge: bool = False
    bandwidth_mib: int | None = Field(default=None, ge=1, le=MAX_BANDWIDTH_MIB)
    # A guest that never converges would hold the drain until the fleet's hard limit.
    completion_timeout_s: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TIMEOUT_S)
    timeout_action: TimeoutAction | None = lax()
    # The migration policy of every child (config/policy_model.py): above the domain's
    # metadata and its host's and group's policies, below the flags here.
    policy: PolicyName | None = None
    tls: bool = False
    copy_storage: CopyStorage | None = lax()  # only for guests with local disks
    parallel: int | None = Field(default=None, ge=2, le=MAX_PARALLEL_CONNECTIONS)
    compressed: bool = False
    compression: CompressionOptions | None = None

    def drain_problems(self) -> list[str]:
        """What no child could run with; the rest is judged on a probe child (the same
        MigrationSpec rules as `drover migrate`, jobs/evacuations.py)."""
        problems = []
        if self.timeout_action is not None and self.completion_timeout_s is None:
            problems.append("--timeout-action needs --completion-timeout")
        if self.timeout_action is TimeoutAction.POSTCOPY and self.tunnelled:
            problems.append("--timeout-action postcopy cannot be tunnelled (post-copy is not)")
        return problems

    def child_fields(self, *, active: bool, local_disks: bool) -> dict[str, Any]:
        """The MigrationSpec fields these options give one child (module docstring)."""
        if not active:
            return {}
        return {
            "transport": Transport.TUNNELLED if self.tunnelled else Transport.NATIVE,
            "auto_converge": self.auto_converge,
            "postcopy": self.timeout_action is TimeoutAction.POSTCOPY,
            "bandwidth_mib": self.bandwidth_mib,
            "completion_timeout_s": self.completion_timeout_s,
            "timeout_action": self.timeout_action,
            "policy": self.policy,
            "tls": self.tls,
            "copy_storage": self.copy_storage if local_disks else None,
            "parallel": self.parallel,
            "compressed": self.compressed,
            "compression": self.compression,
        }

    def unplaceable(self, *, active: bool, local_disks: bool) -> str | None:
        """Why a guest cannot be a child of this drain at all (its reason in the plan)."""
        if self.copy_storage is not None and local_disks and not active:
            return OFFLINE_COPY_REFUSAL
        return None
