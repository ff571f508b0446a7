"""Images a worker makes for --copy-storage: only under its storage directories, recorded in
its own ledger first, and a rollback removes what the ledger holds and nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs.record import DiskFacts
from worker.ledger import Ledger
from worker.storage import StorageError, confined, create_targets, disk_sources, remove_own

MIB = 1024 * 1024


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(str(tmp_path / "state"))


def test_the_ledger_is_private_to_root(tmp_path: Path, ledger: Ledger) -> None:
    state = tmp_path / "state"
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "ledger.sqlite3").stat().st_mode & 0o777 == 0o600


def test_targets_are_made_recorded_and_removed_by_the_ledger(images: Path, ledger: Ledger) -> None:
    disk = DiskFacts(path=str(images / "a.qcow2"), format="qcow2", capacity=MIB)
    made = create_targets([disk], [str(images)], ledger, "job000000001")
    assert made == [str(images / "a.qcow2")] and (images / "a.qcow2").exists()
    assert ledger.images("job000000001") == made
    assert remove_own(ledger, "job000000001", [str(images)], set()) == (made, [])
    assert not (images / "a.qcow2").exists() and ledger.images("job000000001") == []


@pytest.mark.parametrize(
    "path",
    ["/etc/drover-test-victim", "/var/lib/libvirt/images/../../../etc/x", "relative.qcow2"],
)
def test_a_target_outside_the_storage_dirs_is_refused(
    images: Path, ledger: Ledger, path: str
) -> None:
    with pytest.raises(StorageError):
        create_targets(
            [DiskFacts(path=path, format="raw", capacity=MIB)], [str(images)], ledger, "j"
        )
    assert ledger.images("j") == []


def test_a_symlinked_directory_does_not_lead_out(
    images: Path, ledger: Ledger, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, images / "link")
    with pytest.raises(StorageError, match="outside"):
        confined(str(images / "link" / "x.qcow2"), [str(images)])


def test_an_existing_file_is_never_overwritten(images: Path, ledger: Ledger) -> None:
    victim = images / "taken.raw"
    victim.write_text("keep me")
    with pytest.raises(StorageError, match="already exists"):
        create_targets(
            [DiskFacts(path=str(victim), format="raw", capacity=MIB)], [str(images)], ledger, "j"
        )
    assert victim.read_text() == "keep me"


def test_an_unknown_format_never_reaches_qemu_img(images: Path, ledger: Ledger) -> None:
    disk = DiskFacts(path=str(images / "x"), format="raw -o preallocation=full", capacity=MIB)
    with pytest.raises(StorageError, match="not supported"):
        create_targets([disk], [str(images)], ledger, "j")
    assert not (images / "x").exists()


def test_rollback_removes_only_what_this_worker_made(images: Path, ledger: Ledger) -> None:
    """A path the job record names but the ledger does not is never touched."""
    victim = images / "someone-elses.qcow2"
    victim.write_text("not ours")
    assert remove_own(ledger, "job000000002", [str(images)], set()) == ([], [])
    assert victim.read_text() == "not ours"


def test_an_image_a_domain_uses_is_never_removed(images: Path, ledger: Ledger) -> None:
    """The job's guest arrived (whatever its record says): the image it runs on, named by
    its domain XML here, stays; the ledger forgets it as the job's all the same."""
    disk = DiskFacts(path=str(images / "b.qcow2"), format="qcow2", capacity=MIB)
    made = create_targets([disk], [str(images)], ledger, "job000000004")
    xml = (
        "<domain><devices><disk type='file' device='disk'>"
        f"<source file='{images / 'b.qcow2'}'/><target dev='vda'/></disk></devices></domain>"
    )
    assert remove_own(ledger, "job000000004", [str(images)], disk_sources(xml)) == ([], made)
    assert (images / "b.qcow2").exists() and ledger.images("job000000004") == []


def test_disk_sources_name_backing_chains_and_block_devices(tmp_path: Path) -> None:
    xml = (
        "<domain><devices>"
        "<disk type='file' device='disk'><source file='/img/top.qcow2'/>"
        "<backingStore type='file'><source file='/img/base.qcow2'/></backingStore>"
        "<target dev='vda'/></disk>"
        "<disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vdb'/></disk>"
        "<disk type='network' device='disk'><source protocol='nbd' name='x'/>"
        "<target dev='vdc'/></disk>"
        "</devices></domain>"
    )
    assert disk_sources(xml) == {
        os.path.realpath(p) for p in ("/img/top.qcow2", "/img/base.qcow2", "/dev/vg/lv")
    }


def test_phases_run_once_per_job_on_a_host(ledger: Ledger) -> None:
    assert ledger.claim("job000000003", "perform")
    assert not ledger.claim("job000000003", "perform")
    ledger.unclaim("job000000003", "perform")
    assert ledger.claim("job000000003", "perform")
