"""Build the lab's Linux guest from Debian's own packages: kernel, initramfs, disk image.

Why: migration is judged by what a real guest sees (its network, its disk), which the lab's
tiny kernels cannot show. The guest is Debian's cloud kernel booted directly (no bootloader)
with an initramfs made here: static busybox, the virtio modules from the same kernel package,
e2fsck and its libraries from this host's e2fsprogs, and lab/guest/linux-init.sh as /init.
Nothing is installed on the host: the two .deb files are fetched with `apt-get download` and
unpacked with `dpkg-deb -x` into a cache that survives `lab down`, so the next `lab up`
builds nothing.
"""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lab.proc import LabError, run

# The Debian meta package whose dependency names the current cloud kernel (virtio drivers
# as modules, few others: the smallest of Debian's kernels that boots a KVM/QEMU guest).
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# Load order matters (no modules.dep in the package: depmod runs at install, not here).
VIRTIO_MODULES = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
)
E2FSCK = "/sbin/e2fsck"
GUEST_FILES = Path(__file__).resolve().parent / "guest"
CACHE_ENV = "DROVER_GUEST_CACHE"
# The repository's .cache (where `make` keeps its stamps), unless told otherwise.
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "linux-guest"
DISK_SIZE_MIB = 64
APT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class LinuxImage:
    """What a Linux guest boots: the kernel and the initramfs (read-only, shared by guests)."""

    kernel: Path
    initrd: Path


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))


def _apt_download(package: str, dest: Path) -> Path:
    """`apt-get download` one package into `dest` (after `apt-get update` if apt knows it not)."""
    existing = sorted(dest.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    for attempt in (1, 2):
        proc = subprocess.run(
            ["apt-get", "download", "-q", package],
            cwd=dest,
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT_S,
            check=False,
        )
        found = sorted(dest.glob(f"{package}_*.deb"))
        if found:
            return found[-1]
        if attempt == 1:
            run(["apt-get", "update", "-qq"], timeout=APT_TIMEOUT_S)
    raise LabError(f"apt-get download {package} failed: {proc.stderr.strip()[-200:]}")


def _kernel_package() -> str:
    """The versioned kernel package the meta package points at (e.g. linux-image-6.1.0-57-...)."""
    for attempt in (1, 2):
        out = run(["apt-cache", "depends", KERNEL_META_PACKAGE], check=False)
        for line in out.splitlines():
            word = line.strip().removeprefix("Depends:").strip()
            if line.strip().startswith("Depends:") and word.startswith("linux-image-"):
                return word
        if attempt == 1:
            run(["apt-get", "update", "-qq"], timeout=APT_TIMEOUT_S)
    raise LabError(f"apt knows no {KERNEL_META_PACKAGE}: check the Debian sources")


def _unpack(deb: Path, into: Path) -> Path:
    if not into.exists():
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=into.parent))
        run(["dpkg-deb", "-x", str(deb), str(tmp)], timeout=APT_TIMEOUT_S)
        os.replace(tmp, into)
    return into


def _copy_with_libs(binary: str, root: Path) -> None:
    """Copy a dynamically linked host binary and every library `ldd` names into `root`."""
    paths = [binary]
    for line in run(["ldd", binary]).splitlines():
        parts = line.split()
        for p in parts:
            if p.startswith("/"):
                paths.append(p)
    for p in paths:
        target = root / p.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(p), target)


def _copy_module(src: Path, dest: Path) -> None:
    """Copy a kernel module; a compressed one (`.ko.xz`, as later Debian kernels ship them)
    is decompressed on the host, since busybox insmod reads only plain `.ko` files."""
    if src.exists():
        shutil.copy2(src, dest)
        return
    packed = src.with_name(src.name + ".xz")
    if not packed.exists():
        raise LabError(f"the kernel package has no module {src.name}")
    dest.write_bytes(lzma.decompress(packed.read_bytes()))


def _build_initrd(busybox: Path, modules: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".initrd-", dir=out.parent) as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "sbin", "lib/modules", "www/cgi-bin", "proc", "sys", "dev", "tmp"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        for rel in VIRTIO_MODULES:
            _copy_module(modules / rel, root / "lib" / "modules" / Path(rel).name)
        shutil.copy2(GUEST_FILES / "linux-init.sh", root / "init")
        shutil.copy2(GUEST_FILES / "writer.sh", root / "bin" / "writer.sh")
        shutil.copy2(GUEST_FILES / "agent.cgi", root / "www" / "cgi-bin" / "agent")
        for f in (root / "init", root / "bin" / "writer.sh", root / "www" / "cgi-bin" / "agent"):
            f.chmod(0o755)
        _copy_with_libs(E2FSCK, root)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        archive = subprocess.run(
            [str(busybox), "cpio", "-o", "-H", "newc"],
            cwd=root,
            input=files,
            capture_output=True,
            check=True,
        ).stdout
        raw = Path(tmp) / "initrd.cpio"
        raw.write_bytes(archive)
        run(["gzip", "-9", "-n", str(raw)])
        os.replace(Path(tmp) / "initrd.cpio.gz", out)


def _inputs_stamp() -> str:
    """What the initramfs is made from: rebuilt when a guest script changes."""
    return ",".join(
        f"{p.name}:{int(p.stat().st_mtime)}"
        for p in sorted(GUEST_FILES.glob("*"))
        if p.suffix in (".sh", ".cgi")
    )


def build_image() -> LinuxImage:
    """The kernel and initramfs, built once into the cache (Debian packages only)."""
    cache = cache_dir()
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    kernel_pkg = _kernel_package()
    kernel_root = _unpack(_apt_download(kernel_pkg, debs), cache / kernel_pkg)
    busybox_root = _unpack(_apt_download(BUSYBOX_PACKAGE, debs), cache / BUSYBOX_PACKAGE)
    vmlinuz = sorted((kernel_root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise LabError(f"{kernel_pkg} has no /boot/vmlinuz-*")
    release = vmlinuz[-1].name.removeprefix("vmlinuz-")
    modules = kernel_root / "lib" / "modules" / release / "kernel"
    initrd = cache / f"initrd-{release}.cpio.gz"
    stamp = cache / f"initrd-{release}.inputs"
    if not initrd.exists() or not stamp.exists() or stamp.read_text() != _inputs_stamp():
        _build_initrd(busybox_root / "bin" / "busybox", modules, initrd)
        stamp.write_text(_inputs_stamp())
    return LinuxImage(kernel=vmlinuz[-1], initrd=initrd)


def make_disk(path: Path, size_mib: int = DISK_SIZE_MIB) -> None:
    """An empty ext4 file system in a qcow2 image at `path` (mkfs on a raw file, converted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".disk-", dir=path.parent) as tmp:
        raw = Path(tmp) / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        run(["mkfs.ext4", "-q", "-F", "-L", "drover-data", str(raw)])
        run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)])


def check_disk(path: Path) -> tuple[int, str]:
    """e2fsck -fn on a stopped guest's qcow2 (converted to raw first): exit code and output."""
    with tempfile.TemporaryDirectory(prefix=".fsck-", dir=path.parent) as tmp:
        raw = Path(tmp) / "disk.raw"
        run(["qemu-img", "convert", "-q", "-U", "-O", "raw", str(path), str(raw)])
        proc = subprocess.run(
            [E2FSCK, "-fn", str(raw)], capture_output=True, text=True, check=False
        )
        return proc.returncode, proc.stdout + proc.stderr
