"""A call on a connection that died with its libvirtd is made again on a fresh one; a request
libvirt refused is not (it would be refused again, or worse, done twice)."""

from __future__ import annotations

import libvirt
import pytest

from tests.support.libvirt_errors import libvirt_error
from worker.libvirt_host import LibvirtHost

BROKEN_PIPE = "Cannot write data: Broken pipe"


class Flaky:
    """Fails with `errors` first, then answers."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def host() -> LibvirtHost:
    return LibvirtHost("qemu:///system")  # never opened: the calls below do not use it


def test_a_dead_connection_is_replaced_and_the_call_made_again() -> None:
    call = Flaky(libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, BROKEN_PIPE))
    retries: list[tuple[str, int]] = []
    got = host().reconnecting(
        call, attempts=3, delay=0, on_retry=lambda e, n: retries.append((e, n))
    )
    assert (got, call.calls) == ("done", 2)
    assert retries == [(BROKEN_PIPE, 1)]


def test_the_last_connection_error_is_raised_after_every_attempt() -> None:
    call = Flaky(*(libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, BROKEN_PIPE) for _ in range(3)))
    with pytest.raises(libvirt.libvirtError, match="Broken pipe"):
        host().reconnecting(call, attempts=3, delay=0)
    assert call.calls == 3


def test_a_refusal_is_not_retried() -> None:
    call = Flaky(libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running"))
    with pytest.raises(libvirt.libvirtError, match="not running"):
        host().reconnecting(call, attempts=3, delay=0)
    assert call.calls == 1
