"""A copy a migration is bringing in is not the host's own guest (worker/libvirt_states.py
`migrating_in`): an evacuation's planner took one for a guest of the host being drained
(probe). libvirt tells it by refusing its job's statistics on the destination, as the lab
shows ("available only on the source host")."""

from __future__ import annotations

import libvirt
import pytest

from tests.support.libvirt_errors import libvirt_error
from worker.libvirt_states import migrating_in


class Dom:
    def __init__(self, active: bool, job_error: int | None = None) -> None:
        self.active, self.job_error = active, job_error

    def isActive(self) -> int:
        return int(self.active)

    def jobInfo(self) -> list[int]:
        if self.job_error is not None:
            raise libvirt_error(self.job_error, "refused")
        return [libvirt.VIR_DOMAIN_JOB_UNBOUNDED, 0]


@pytest.mark.parametrize(
    ("dom", "incoming"),
    [
        (Dom(True, libvirt.VIR_ERR_OPERATION_UNSUPPORTED), True),  # the destination's copy
        (Dom(True), False),  # a migration going out: the host's own guest
        (Dom(True, libvirt.VIR_ERR_OPERATION_INVALID), False),  # stopped meanwhile
        (Dom(False), False),  # defined, not running
    ],
    ids=["incoming", "outgoing", "stopped", "inactive"],
)
def test_only_a_copy_coming_in_is_left_out(dom: Dom, incoming: bool) -> None:
    assert migrating_in(dom) is incoming  # type: ignore[arg-type]
