"""The rules a `--xml` / `--persistent-xml` must follow (jobs/domain_xml.py), over strings."""

from __future__ import annotations

import pytest

from jobs.domain_xml import (
    MAX_DOMAIN_XML_CHARS,
    DomainXMLError,
    check_against_guest,
    form_problem,
    path_allowed,
)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
UUID = "6f1c2a0e-8f3b-4d7e-9a55-0c1d2e3f4a5b"
DIRS = ["/var/lib/libvirt/images"]
GUEST = f"""<domain type='qemu' id='7'>
  <name>web01</name>
  <uuid>{UUID}</uuid>
  <memory unit='KiB'>65536</memory>
  <vcpu placement='static'>1</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def edited(old: str, new: str, base: str = GUEST) -> str:
    assert old in base
    return base.replace(old, new, 1)


def check(xml: str, arrives_as: str = "web01") -> dict[str, str]:
    return check_against_guest(xml, GUEST, "--xml", arrives_as, DIRS).disk_moves


def refusal(xml: str, arrives_as: str = "web01") -> str:
    with pytest.raises(DomainXMLError) as exc:
        check(xml, arrives_as)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_the_same_xml_reindented_and_reordered_attributes_passes() -> None:
    same = GUEST.replace("  ", "    ").replace(
        "<target dev='hda' bus='ide'/>", "<target bus='ide' dev='hda'/>"
    )
    assert check(same) == {}


def test_description_title_and_metadata_may_change() -> None:
    xml = edited(
        "<memory",
        "<title>t</title><description>moved by drover</description>"
        "<metadata><x:a xmlns:x='urn:x'>1</x:a></metadata><memory",
    )
    assert check(xml) == {}


def test_a_disk_may_move_within_the_storage_dirs() -> None:
    xml = edited("images/web01.qcow2", "images/moved/web01.qcow2")
    assert check(xml) == {
        "/var/lib/libvirt/images/web01.qcow2": "/var/lib/libvirt/images/moved/web01.qcow2"
    }


@pytest.mark.parametrize(
    ("xml", "arrives_as", "expected"),
    [
        (edited("<name>web01", "<name>web02"), "web01", "renames the guest to 'web02'"),
        (GUEST, "web02", "renames the guest to 'web01'; it arrives as 'web02'"),
        (edited(UUID, "00000000-0000-4000-8000-000000000001"), "web01", "another UUID"),
        (edited("type='qemu'", "type='kvm'"), "web01", "changes the domain type"),
        (edited("bin/qemu-system-x86_64", "bin/evil"), "web01", "changes the emulator"),
        (
            edited(
                "<domain type='qemu'", "<domain xmlns:qemu='" + QEMU_NS + "' type='qemu'"
            ).replace(
                "</devices>",
                "</devices><qemu:commandline><qemu:arg value='-s'/></qemu:commandline>",
            ),
            "web01",
            "qemu:commandline (QEMU passthrough is refused)",
        ),
        (
            edited("/var/lib/libvirt/images/web01.qcow2", "/etc/shadow"),
            "web01",
            "outside the destination's storage directories",
        ),
        (
            edited("/var/lib/libvirt/images/web01.qcow2", "/var/lib/libvirt/images/../x"),
            "web01",
            "outside the destination's storage directories",
        ),
        (edited("65536", "131072"), "web01", "changes domain/memory[1]"),
        (
            edited("<memballoon model='none'/>", "<memballoon model='none'/><hostdev/>"),
            "web01",
            "changes domain/devices[1]/hostdev[1]",
        ),
        (
            edited("<os>", "<os><kernel>/tmp/k</kernel>"),
            "web01",
            "changes domain/os[1]",
        ),
    ],
    ids=[
        "renamed",
        "not-the-dname",
        "new-uuid",
        "type",
        "emulator",
        "qemu-commandline",
        "disk-outside",
        "disk-dotdot",
        "memory",
        "extra-device",
        "kernel",
    ],
)
def test_refusals_name_what_is_refused(xml: str, arrives_as: str, expected: str) -> None:
    assert expected in refusal(xml, arrives_as)


def test_a_dname_is_the_name_the_xml_must_carry() -> None:
    assert check(edited("<name>web01", "<name>web02"), "web02") == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<domain", "not well-formed XML"),
        ("<network><name>web01</name></network>", "the root element is <network>"),
        ("<!DOCTYPE d [<!ENTITY a 'b'>]><domain/>", "DOCTYPE or entities"),
        ("<domain>" + " " * MAX_DOMAIN_XML_CHARS + "</domain>", "over 262144 characters"),
        ("<domain><name>other</name></domain>", "names the guest 'other'"),
        ("<domain><name>web01</name></domain>", "must carry the guest's <uuid>"),
    ],
)
def test_form_problems_for_the_producer(text: str, expected: str) -> None:
    problem = form_problem(text, "--xml", "web01")
    assert problem is not None and expected in problem


def test_form_of_a_good_xml_is_fine() -> None:
    assert form_problem(GUEST, "--xml", "web01") is None


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/var/lib/libvirt/images/a.qcow2", True),
        ("/var/lib/libvirt/images/sub/a.raw", True),
        ("/var/lib/libvirt/images", False),
        ("/var/lib/libvirt/imagesX/a", False),
        ("/var/lib/libvirt/images/../../a", False),
        ("var/lib/libvirt/images/a", False),
        ("/var/lib/libvirt/images/a b", False),
    ],
)
def test_path_allowed(path: str, ok: bool) -> None:
    assert path_allowed(path, DIRS) is ok
