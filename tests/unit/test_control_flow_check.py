"""The source's `control_flow` pre-check: an unmanaged direct migration from a libvirtd whose
hypervisor driver has none (QEMU's) is refused before anything moves, its dry run included
(tests/lab/test_modes.py shows libvirt refusing it on the lab); other control flows never ask."""

from __future__ import annotations

import pytest

from jobs.spec import MigrationSpec
from worker.precheck_source import source_checks, unmanaged_refusal

XML = "<domain type='kvm'><name>g</name><devices/></domain>"


def spec(**fields: object) -> MigrationSpec:
    return MigrationSpec.model_validate({"domain": "g", "src": "kvm1", "dst": "kvm2", **fields})


def verdicts(s: MigrationSpec, driver: str) -> dict[str, str | None]:
    asked: list[str] = []

    def get_type() -> str:
        asked.append(driver)
        return driver

    found = {name: check() for name, check in source_checks(s, XML, get_type)}
    assert len(asked) == ("control_flow" in found)  # asked once, and only when it matters
    return found


@pytest.mark.parametrize("extra", [{"live": True}, {"live": False}, {"dry_run": True}])
def test_unmanaged_from_qemu_is_refused_live_or_not_and_dry(extra: dict[str, object]) -> None:
    reason = verdicts(spec(control="unmanaged", **extra), "QEMU")["control_flow"]
    assert reason == (
        "unmanaged direct migration: kvm1's hypervisor driver (QEMU) has none (libvirt: "
        "direct migration is not supported by the source host); use --p2p or --direct"
    )


def test_another_driver_is_left_to_libvirt() -> None:
    assert verdicts(spec(control="unmanaged", live=True), "Xen")["control_flow"] is None
    assert unmanaged_refusal("kvm1", "Test") is None


@pytest.mark.parametrize("control", ["p2p", "direct"])
def test_managed_flows_are_not_checked(control: str) -> None:
    assert "control_flow" not in verdicts(spec(control=control, live=True), "QEMU")
