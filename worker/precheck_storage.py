"""The storage pre-checks as rules over a guest's disks and figures (no host access here).

    unsafe disks     the disks libvirt refuses to migrate (VIR_ERR_MIGRATE_UNSAFE) unless asked
                     with VIR_MIGRATE_UNSAFE: a writable file disk neither copied nor on a
                     shared file system, and, off cluster file systems, a writable disk with a
                     host-cached mode when the guest's QEMU cannot drop its page cache; drover
                     refuses the same disks before anything moves, `--unsafe` is that flag
    chosen disks     `--migrate-disks` names disks the storage copy can move
    shared disks     a disk not copied must be seen by the destination at the same path:
                     there, of the same kind (file or block device) and the same virtual size
                     the source's libvirt reports (blockInfo capacity)
    room             with `--copy-storage`, each destination file system has room for the
                     full capacity of every image made on it

worker/storage_view.py reads the figures on the host that judges (source or destination).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from worker.guest_disks import GuestDisk, copied

# File systems libvirt 9.0 treats as shared storage (virFileIsSharedFS), by their mount type
# (BeeGFS joined the list after 9.0).
SHARED_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "gfs2",
        "gfs",
        "ocfs2",
        "afs",
        "smb3",
        "smbfs",
        "cifs",
        "ceph",
        "gpfs",
        "fuse.glusterfs",
        "fuse.quobyte",
        "acfs",
    }
)
# Of those, the coherent cluster file systems libvirt 9.0 trusts with any cache mode
# (virFileIsClusterFS: GFS2, OCFS2, CephFS and GlusterFS's FUSE client; read from the
# 9.0 library itself, whose mask is 0x446, as the source's comment lags behind).
CLUSTER_FS_TYPES = frozenset({"gfs2", "gfs", "ocfs2", "ceph", "fuse.glusterfs"})
# Cache modes that bypass the host's page cache (libvirt: VIR_DOMAIN_DISK_CACHE_DISABLE is "none").
SAFE_CACHE_MODES = frozenset({"none", "directsync"})
MIB = 1 << 20


@dataclass(frozen=True)
class DropCache:
    """Whether the guest's running QEMU has libvirt's `migration-file-drop-cache` capability:
    True/False as libvirt recorded it, None when that record could not be read (`problem`)."""

    present: bool | None
    problem: str | None = None


@dataclass(frozen=True)
class PathView:
    """What a host sees at a disk's path: nothing, or a file/block device of a size."""

    kind: str | None  # file | block | None when absent (or something else: "other")
    size: int | None = None  # virtual size in bytes; None when it could not be read
    problem: str | None = None  # why the size could not be read


def unsafe_refusal(
    disks: Iterable[GuestDisk],
    copy_storage: bool,
    chosen: tuple[str, ...] | None,
    fs_type: Callable[[str], str],
    drop_cache: Callable[[], DropCache],
) -> str | None:
    """The disks libvirt 9.0 calls unsafe to migrate (qemuMigrationSrcIsSafe), in its order.

    A disk that is read-only, empty or copied is safe. A file disk on a file system that is
    not shared is unsafe whatever its cache mode ("Migration without shared storage is
    unsafe"); on a coherent cluster file system (GFS2, OCFS2, CephFS, GlusterFS) it is safe.
    Every other disk (a file on other shared storage such as NFS, a block device) is safe
    only when `<shareable/>`, with cache `none` or `directsync`, or when the guest's running
    QEMU can drop its page cache on arrival (libvirt's `migration-file-drop-cache`
    capability of that QEMU); otherwise "Migration may lead to data corruption if disks use
    cache other than none or directsync". Network disks (RBD...) are not listed by
    worker/guest_disks.py: libvirt deems them safe. `drop_cache` is asked only when a disk's
    verdict needs it.
    """
    unshared, cached = [], []
    for d in disks:
        if not d.writable or copied(d, copy_storage, chosen):
            continue
        if d.kind == "file":
            fs = fs_type(d.path)
            if fs not in SHARED_FS_TYPES:
                unshared.append(f"{d.target} ({d.path}, cache {d.cache})")
                continue
            if fs in CLUSTER_FS_TYPES:
                continue
        if d.shareable or d.cache in SAFE_CACHE_MODES:
            continue
        cached.append(d)
    reasons = []
    if unshared:
        reasons.append(
            f"{', '.join(unshared)} not copied and not on shared storage, which libvirt "
            "refuses whatever the cache mode; use --copy-storage, or --unsafe if every host "
            "sees it at the same path"
        )
    if cached:
        caps = drop_cache()
        if caps.present is not True:
            shown = ", ".join(f"{d.target} ({d.path}, cache {d.cache})" for d in cached)
            why = (
                "its QEMU cannot drop its page cache on arrival (no migration-file-drop-cache)"
                if caps.present is False
                else f"whether its QEMU can drop its page cache is unknown ({caps.problem})"
            )
            reasons.append(
                f"{shown} on shared storage with a cache mode other than none or directsync "
                f"and {why}, which libvirt refuses as a risk of data corruption; use "
                "cache none/directsync, or --unsafe"
            )
    return f"unsafe to migrate: {'; '.join(reasons)}" if reasons else None


def chosen_refusal(disks: Iterable[GuestDisk], chosen: tuple[str, ...] | None) -> str | None:
    """`--migrate-disks` names only disks the storage copy can move (writable file disks)."""
    if chosen is None:
        return None
    movable = {d.target for d in disks if d.writable and d.kind == "file" and d.device == "disk"}
    missing = [t for t in chosen if t not in movable]
    if not missing:
        return None
    shown = ", ".join(sorted(movable)) or "none"
    return f"--migrate-disks: no writable file disk {', '.join(missing)} (copyable: {shown})"


def unseen_refusal(
    disk: GuestDisk, source_size: int | None, here: PathView, host: str
) -> str | None:
    """Why `host` does not see the disk as the source does, or None when it does."""
    where = f"{disk.target} ({disk.path})"
    if here.kind is None:
        return f"{host} does not see {where}: it is not copied, use --copy-storage"
    if here.kind != disk.kind:
        return f"{host} sees {where} as {here.kind}, the source as {disk.kind}"
    if here.size is None:
        return f"{host} cannot read the size of {where}: {here.problem}"
    if source_size is not None and here.size != source_size:
        return f"{host} sees {where} with {here.size} bytes, the source with {source_size}"
    return None


@dataclass(frozen=True)
class Room:
    """Free space of one destination file system and the images to be made on it."""

    where: str  # the directory measured
    free: int  # bytes available to an unprivileged writer (statvfs f_bavail)
    need: int  # bytes: the sum of the images' capacities


def room_refusal(rooms: Iterable[Room], host: str) -> str | None:
    """The file systems without room for the full capacity of the images made there."""
    short = [
        f"{r.where} has {r.free // MIB} MiB free, the images need {r.need // MIB} MiB"
        for r in rooms
        if r.free < r.need
    ]
    return f"{host}: {'; '.join(short)}" if short else None
