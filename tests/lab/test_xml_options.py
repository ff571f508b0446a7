"""--xml, --persistent-xml, --disks-port and --disks-uri through drover on the real lab.

Every outcome is read from libvirt on both hosts: the change an XML makes shows in the
destination's libvirt XML, a refused XML leaves the guest running where it was with no trace
elsewhere, and a record written straight into Redis with a forbidden XML is refused by the
worker that would have used it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import libvirt
import pytest

from jobs.errors import SubmitError
from jobs.model import Job
from jobs.spec import MigrationSpec
from lab.layout import LabLayout
from lab.proc import run
from tests.support.disk_guest import IMAGES, disk_guest, host_images, undefine
from tests.support.forgery import domain_facts, forge_job, lab_signer
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for

pytestmark = pytest.mark.lab

GUEST = "idle-3"
MIGRATABLE = libvirt.VIR_DOMAIN_XML_MIGRATABLE
INACTIVE = libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
RECOVERY_S = 60.0  # recovery re-sends a phase idle for 30 s; forged records say "long ago"


def xml_of(lab: Lab, host: str, name: str, flags: int = 0) -> str:
    conn = libvirt.open(lab.uri(host))
    try:
        return str(conn.lookupByName(name).XMLDesc(flags))
    finally:
        conn.close()


def described(xml: str, text: str) -> str:
    """`xml` with a <description> (the change drover allows that QEMU never sees)."""
    return re.sub(r"(<uuid>[^<]*</uuid>)", rf"\1<description>{text}</description>", xml, count=1)


def call_params(lab: Lab, job: Job) -> dict[str, Any]:
    started = [e for e in lab.drover.events(job.id) if e["event"] == "migration.started"]
    assert len(started) == 1, started
    params: dict[str, Any] = started[0]["call"]["params"]
    return params


@contextmanager
def listeners(lab: Lab, host: str) -> Iterator[set[str]]:
    """Every TCP listening address seen in `host`'s network namespace while the block runs
    (`ss -ltnH` polled in a thread): where the destination's QEMU waits for the disks."""
    netns = LabLayout.from_env().host(int(host.removeprefix("lab"))).netns
    seen: set[str] = set()
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            out = run(["ip", "netns", "exec", netns, "ss", "-ltnH"])
            seen.update(line.split()[3] for line in out.splitlines() if line.strip())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()


def untouched(lab: Lab, name: str = GUEST) -> None:
    """Running on lab1 as before, not defined anywhere else."""
    assert lab.running_on(name) == ["lab1"]
    assert lab.view("lab1", name).state == libvirt.VIR_DOMAIN_RUNNING
    assert not any(lab.view(h, name).exists for h in lab.hosts() if h != "lab1")


@pytest.fixture
def guest(lab: Lab) -> Iterator[str]:
    """GUEST on lab1, and only there (definitions a test left on lab2 removed) afterwards."""
    lab.home(GUEST)
    yield GUEST
    lab.home(GUEST)
    for host in lab.hosts():
        if host != "lab1":
            undefine(lab, host, GUEST)


@pytest.mark.parametrize(
    "mode",
    [{}, {"control": "direct"}, {"dest_connection": True}],
    ids=["p2p-migrateToURI3", "direct-migrate3", "migrate2-dxml"],
)
def test_xml_with_a_description_arrives_with_it(lab: Lab, guest: str, mode: dict[str, Any]) -> None:
    xml = described(xml_of(lab, "lab1", guest, MIGRATABLE), "moved by drover --xml")
    job = lab.migrate(guest, "lab1", "lab2", dest_xml=xml, **mode)
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on(guest) == ["lab2"]
    assert "<description>moved by drover --xml</description>" in xml_of(lab, "lab2", guest)
    assert "moved by drover --xml" not in xml_of(lab, "lab1", guest, INACTIVE)  # its own
    assert call_params(lab, job)["destination_xml"].startswith(f"{len(xml)} chars, sha256 ")


def test_persistent_xml_is_the_destinations_definition(lab: Lab, guest: str) -> None:
    xml = described(xml_of(lab, "lab1", guest, INACTIVE), "defined by --persistent-xml")
    job = lab.migrate(guest, "lab1", "lab2", persistent=True, persist_xml=xml)
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on(guest) == ["lab2"] and lab.view("lab2", guest).persistent
    assert "defined by --persistent-xml" in xml_of(lab, "lab2", guest, INACTIVE)
    assert "defined by --persistent-xml" not in xml_of(lab, "lab2", guest)  # not the live one


def test_xml_naming_the_guest_otherwise_is_refused_before_queueing(lab: Lab, guest: str) -> None:
    xml = xml_of(lab, "lab1", guest, MIGRATABLE).replace(f"<name>{guest}<", "<name>renamed<")
    with pytest.raises(SubmitError, match="--xml names the guest 'renamed'"):
        lab.drover.submit(domain=guest, src="lab1", dst="lab2", live=True, dest_xml=xml)
    with pytest.raises(SubmitError, match="it must be 'other'"):  # --dname: the XML's name
        lab.drover.submit(
            domain=guest, src="lab1", dst="lab2", live=True, dname="other", dest_xml=xml
        )
    untouched(lab)


def _new_uuid(xml: str) -> str:
    return re.sub(r"<uuid>[^<]*</uuid>", "<uuid>00000000-0000-4000-8000-00000000d00d</uuid>", xml)


def _other_emulator(xml: str) -> str:
    return re.sub(r"<emulator>[^<]*</emulator>", "<emulator>/bin/sh</emulator>", xml)


def _commandline(xml: str) -> str:
    passthrough = (
        f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:arg value='-trace'/>"
        "<qemu:arg value='enable=*'/></qemu:commandline>"
    )
    return xml.replace("</domain>", f"{passthrough}</domain>")


def _kvm(xml: str) -> str:
    return xml.replace("<domain type='qemu'", "<domain type='kvm'", 1)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_new_uuid, "--xml gives the guest another UUID"),
        (_other_emulator, "--xml changes the emulator to '/bin/sh'"),
        (_commandline, "--xml carries qemu:commandline"),
        (_kvm, "--xml changes the domain type"),
    ],
    ids=["new-uuid", "emulator", "qemu-commandline", "domain-type"],
)
def test_a_forbidden_xml_is_refused_with_the_guest_untouched(
    lab: Lab, guest: str, change: Any, reason: str
) -> None:
    xml = change(xml_of(lab, "lab1", guest, MIGRATABLE))
    job = lab.migrate(guest, "lab1", "lab2", dest_xml=xml)
    assert job.state.value == "failed"
    assert job.reason is not None and reason in job.reason, job.reason
    assert set(job.phases) == {"source_preflight"}  # refused before anything moved
    untouched(lab)


def test_a_disk_moved_outside_the_storage_dirs_is_refused(lab: Lab) -> None:
    with disk_guest(lab, "xmldisk-1") as path:
        xml = xml_of(lab, "lab1", "xmldisk-1", MIGRATABLE).replace(path, "/etc/xmldisk-1.qcow2")
        job = lab.migrate("xmldisk-1", "lab1", "lab2", copy_storage="all", dest_xml=xml)
        assert job.state.value == "failed"
        assert "outside the destination's storage directories" in str(job.reason), job.reason
        untouched(lab, "xmldisk-1")
        assert not (host_images(lab, "lab2") / "xmldisk-1.qcow2").exists()


def test_xml_moves_a_copied_disk_within_the_storage_dirs(lab: Lab) -> None:
    moved = f"{IMAGES}/moved/xmldisk-2.qcow2"
    with disk_guest(lab, "xmldisk-2") as path:
        xml = xml_of(lab, "lab1", "xmldisk-2", MIGRATABLE).replace(path, moved)
        job = lab.migrate("xmldisk-2", "lab1", "lab2", copy_storage="all", dest_xml=xml)
        assert job.state.value == "succeeded", job.reason
        assert lab.running_on("xmldisk-2") == ["lab2"]
        assert f"<source file='{moved}'" in xml_of(lab, "lab2", "xmldisk-2")
        assert job.handoff.created_images == [moved]
        assert (host_images(lab, "lab2") / "moved" / "xmldisk-2.qcow2").exists()
        assert not (host_images(lab, "lab2") / "xmldisk-2.qcow2").exists()


@pytest.mark.parametrize("where", ["disks_port", "disks_uri"])
def test_copy_storage_over_the_disks_port_or_uri(lab: Lab, where: str) -> None:
    address = lab.status["hosts"]["lab2"]["address"]
    option: dict[str, Any] = (
        {"disks_port": 49300} if where == "disks_port" else {"disks_uri": f"tcp://{address}:49301"}
    )
    port = 49300 if where == "disks_port" else 49301
    with disk_guest(lab, "nbd-1") as path, listeners(lab, "lab2") as seen:
        job = lab.migrate("nbd-1", "lab1", "lab2", copy_storage="all", **option)
        assert any(a.endswith(f":{port}") for a in seen), sorted(seen)  # lab2's NBD server
        assert job.state.value == "succeeded", job.reason
        assert lab.running_on("nbd-1") == ["lab2"]
        assert not lab.view("lab1", "nbd-1").active
        assert f"<source file='{path}'" in xml_of(lab, "lab2", "nbd-1")
        assert (host_images(lab, "lab2") / "nbd-1.qcow2").exists()
        params = call_params(lab, job)
        assert {k: params[k] for k in option} == option
        started = [e for e in lab.drover.events(job.id) if e["event"] == "migration.started"]
        assert "VIR_MIGRATE_NON_SHARED_DISK" in started[0]["call"]["flags"]


def test_a_disks_uri_toward_another_host_is_refused(lab: Lab) -> None:
    lab3 = lab.status["hosts"]["lab3"]["address"]
    with pytest.raises(SubmitError, match=r"--disks-uri .*lab2 receives migrations only at"):
        lab.drover.submit(
            domain=GUEST,
            src="lab1",
            dst="lab2",
            copy_storage="all",
            disks_uri=f"tcp://{lab3}:49301",
        )


@pytest.mark.parametrize(
    ("state", "ended", "refuser", "host"),
    [
        ("preflight", ("source_preflight",), "destination_prepare", "lab2"),
        ("prepared", ("source_preflight", "destination_prepare"), "perform", "lab1"),
    ],
    ids=["destination-prepare-refuses", "source-perform-refuses"],
)
def test_a_signed_record_with_forbidden_xml_is_refused_by_the_worker(
    lab: Lab, guest: str, state: str, ended: tuple[str, ...], refuser: str, host: str
) -> None:
    """A record written into Redis by hand (signed with the lab's key, so it passes the
    signature check: what a producer that skipped its own checks could send) whose XML
    smuggles qemu:commandline. Recovery sends its next phase; the worker that runs it
    checks the XML against libvirt and refuses."""
    xml = _commandline(xml_of(lab, "lab1", guest, MIGRATABLE))
    spec = MigrationSpec(domain=guest, src="lab1", dst="lab2", dest_xml=xml)
    forged = forge_job(
        lab,
        spec,
        state=state,
        facts=domain_facts(lab, "lab1", guest),
        ended_phases=ended,
        signer=lab_signer(lab),
        # and lab2's signed word that it prepared it, when the record says so
        prepared_on="lab2" if "destination_prepare" in ended else None,
    )
    wait_for(lambda: lab.drover.job(forged.id).terminal, RECOVERY_S + JOB_TIMEOUT_S, "the job")
    job = lab.drover.job(forged.id)
    assert job.state.value == "failed", job
    assert "--xml carries qemu:commandline" in str(job.reason), job.reason
    refused = job.phases[refuser]  # the phase recovery sent, on the worker that would act
    assert refused.host == host and "qemu:commandline" in str(refused.error), refused
    assert not [e for e in lab.drover.events(forged.id) if e["event"] == "migration.started"]
    untouched(lab)
