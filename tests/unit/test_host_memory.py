"""A host's committed memory counts the guests running there; one that goes while it is
counted (another job's rollback destroying its incoming copy) is no reason to refuse an
unrelated migration (probe: "memory check could not be made: Domain not found")."""

from __future__ import annotations

import libvirt
import pytest

from tests.support.libvirt_errors import libvirt_error
from worker.host_memory import active_memory_mib

MIB_KIB = 1024


class Guest:
    def __init__(self, mib: int | None, error: int | None = None) -> None:
        self.mib, self.error = mib, error

    def maxMemory(self) -> int:  # libvirt's name
        if self.error is not None:
            raise libvirt_error(self.error, "as libvirt says it", libvirt.VIR_FROM_QEMU)
        assert self.mib is not None
        return self.mib * MIB_KIB


class Host:
    def __init__(self, *guests: Guest) -> None:
        self.guests = list(guests)

    def listAllDomains(self, flags: int = 0) -> list[Guest]:  # libvirt's name
        assert flags == libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
        return self.guests


def test_a_guest_gone_while_counted_holds_nothing() -> None:
    host = Host(Guest(64), Guest(None, libvirt.VIR_ERR_NO_DOMAIN), Guest(128))
    assert active_memory_mib(host) == 192  # type: ignore[arg-type]


def test_any_other_error_is_raised_not_counted_as_nothing() -> None:
    host = Host(Guest(64), Guest(None, libvirt.VIR_ERR_OPERATION_FAILED))
    with pytest.raises(libvirt.libvirtError):
        active_memory_mib(host)  # type: ignore[arg-type]
