"""libvirt's migration guide, "configuration file handling": all 16 rows of its table, through
drover, on the real lab; every outcome is checked through libvirt on both hosts.

Each row gets a fresh 64 MiB no-OS guest `cfg-<row>` with a fixed UUID. Its source definition
says `<description>source</description>`; a destination config, where the row has one, is an
inactive definition of the same domain (same name, same UUID) saying `dest-original`, so the
destination's config afterwards tells "unchanged" from "replaced with source".
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import libvirt
import pytest

from lab.guests import GuestSpec, domain_xml
from tests.support.lab_fixtures import Lab

pytestmark = pytest.mark.lab

SOURCE = "source"
DEST_ORIGINAL = "dest-original"
MEMORY_MIB = 64


@dataclass(frozen=True)
class Row:
    number: int
    # before
    src_persistent: bool
    dest_config: bool
    # flags
    undefine_source: bool
    persistent: bool
    # after
    dest_persistent: bool
    src_config_after: bool
    dest_config_after: str | None  # description of lab2's inactive definition; None: none

    @property
    def id(self) -> str:
        return "-".join(
            (
                "persistent" if self.src_persistent else "transient",
                "dest" if self.dest_config else "nodest",
                "undef" if self.undefine_source else "noundef",
                "pers" if self.persistent else "nopers",
            )
        )

    @property
    def guarded(self) -> bool:
        """drover refuses this row without --force: it leaves the domain defined nowhere."""
        return (
            self.src_persistent
            and self.undefine_source
            and not self.persistent
            and not self.dest_config
        )

    @property
    def name(self) -> str:
        return f"cfg-{self.number}"

    @property
    def uuid(self) -> str:
        return f"c0f16000-0000-4000-8000-{self.number:012d}"


T, P = False, True  # source / destination type: transient, persistent
N, Y = False, True
UNCHANGED, REPLACED = DEST_ORIGINAL, SOURCE

# The guide's table, row for row: before (src type, src cfg implied, dest cfg), flags
# (--undefinesource, --persistent), after (dest type, src cfg, dest cfg content).
TABLE = [
    Row(1, T, N, N, N, T, N, None),
    Row(2, T, N, Y, N, T, N, None),
    Row(3, T, N, N, Y, P, N, SOURCE),
    Row(4, T, N, Y, Y, P, N, SOURCE),
    Row(5, T, Y, N, N, P, N, UNCHANGED),
    Row(6, T, Y, Y, N, P, N, UNCHANGED),
    Row(7, T, Y, N, Y, P, N, REPLACED),
    Row(8, T, Y, Y, Y, P, N, REPLACED),
    Row(9, P, N, N, N, T, Y, None),
    Row(10, P, N, Y, N, T, N, None),
    Row(11, P, N, N, Y, P, Y, SOURCE),
    Row(12, P, N, Y, Y, P, N, SOURCE),
    Row(13, P, Y, N, N, P, Y, UNCHANGED),
    Row(14, P, Y, Y, N, P, N, UNCHANGED),
    Row(15, P, Y, N, Y, P, Y, REPLACED),
    Row(16, P, Y, Y, Y, P, N, REPLACED),
]
GUARDED = next(r for r in TABLE if r.guarded)


@contextmanager
def connect(uri: str) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(uri)
    try:
        yield conn
    finally:
        conn.close()


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def guest_xml(row: Row, description: str) -> str:
    xml = domain_xml(GuestSpec(row.name, MEMORY_MIB))
    extra = f"</name>\n  <uuid>{row.uuid}</uuid>\n  <description>{description}</description>"
    return xml.replace("</name>", extra, 1)


def description(dom: libvirt.virDomain, flags: int = 0) -> str | None:
    return ET.fromstring(dom.XMLDesc(flags)).findtext("description")


def remove_everywhere(lab: Lab, name: str) -> None:
    """Destroy and undefine `name` on both hosts; a host that does not have it is fine."""
    for host in ("lab1", "lab2"):
        with connect(lab.uri(host)) as conn:
            dom = lookup(conn, name)
            if dom is None:
                continue
            persistent = bool(dom.isPersistent())
            try:
                if dom.isActive():
                    dom.destroy()
                if persistent:
                    dom.undefine()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise


def set_up(lab: Lab, row: Row) -> None:
    """The row's "before": the guest running on lab1, and lab2's config if the row has one."""
    remove_everywhere(lab, row.name)
    with connect(lab.uri("lab1")) as conn:
        if row.src_persistent:
            conn.defineXML(guest_xml(row, SOURCE)).create()
        else:
            conn.createXML(guest_xml(row, SOURCE), 0)
    if row.dest_config:
        with connect(lab.uri("lab2")) as conn:
            conn.defineXML(guest_xml(row, DEST_ORIGINAL))
    # The "before" columns, as libvirt reports them.
    src, dst = lab.view("lab1", row.name), lab.view("lab2", row.name)
    assert src.active and src.state == libvirt.VIR_DOMAIN_RUNNING
    assert src.persistent == row.src_persistent
    assert dst.exists == row.dest_config and not dst.active


@pytest.mark.parametrize("row", TABLE, ids=[r.id for r in TABLE])
def test_config_file_handling_row(lab: Lab, row: Row) -> None:
    set_up(lab, row)
    try:
        job = lab.migrate(
            row.name,
            "lab1",
            "lab2",
            persistent=row.persistent,
            undefine_source=row.undefine_source,
            force=row.guarded,
        )
        assert job.state.value == "succeeded", job.reason
        assert job.source.dest_config_present is row.dest_config

        with connect(lab.uri("lab2")) as conn:
            dom = lookup(conn, row.name)
            assert dom is not None, f"{row.name} is not on lab2"
            assert dom.UUIDString() == row.uuid
            assert dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            assert description(dom) == SOURCE  # the running guest is the source's
            assert bool(dom.isPersistent()) is row.dest_persistent, "destination type"
            if row.dest_config_after is not None:
                inactive = description(dom, libvirt.VIR_DOMAIN_XML_INACTIVE)
                assert inactive == row.dest_config_after, "destination config"

        with connect(lab.uri("lab1")) as conn:
            dom = lookup(conn, row.name)
            assert dom is None or not dom.isActive(), f"{row.name} still active on lab1"
            src_config = dom is not None and bool(dom.isPersistent())
            assert src_config is row.src_config_after, "source config"
            if dom is not None:
                assert description(dom, libvirt.VIR_DOMAIN_XML_INACTIVE) == SOURCE
        assert lab.running_on(row.name) == ["lab2"]
    finally:
        remove_everywhere(lab, row.name)


def test_guarded_row_without_force_is_refused_before_anything_moves(lab: Lab) -> None:
    row = GUARDED
    set_up(lab, row)
    try:
        job = lab.migrate(row.name, "lab1", "lab2", persistent=False, undefine_source=True)
        assert job.state.value == "failed"
        assert job.reason is not None
        assert "defined nowhere" in job.reason and "--force" in job.reason
        assert job.phases["destination_prepare"].error == job.reason
        assert "perform" not in job.phases
        assert lab.drover.store.reserved_mib("lab2") == 0

        assert lab.running_on(row.name) == ["lab1"]
        src = lab.view("lab1", row.name)
        assert src.state == libvirt.VIR_DOMAIN_RUNNING and src.persistent
        assert not lab.view("lab2", row.name).exists
    finally:
        remove_everywhere(lab, row.name)
