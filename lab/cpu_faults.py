"""Lab fault: a host whose hypervisor lacks a CPU feature that another host offers.

The lab's hosts all run on one machine, so their CPUs are the same. libvirt describes what
QEMU offers from its per-host capabilities cache (/var/cache/libvirt/qemu/capabilities/
*.xml, the host's own copy in the lab); libvirt keeps a cache file whose QEMU binary and
libvirt version still match, so a host whose cached TCG host CPU (`<hostCPU type='tcg'>`)
says a feature is absent is, for libvirt on that host, a host without it:
`virsh hypervisor-cpu-compare` there reports a CPU requiring the feature as incompatible
(measured with libvirt 9.0: `Host CPU does not provide required features: aes`), while the
other hosts accept it. The edit is undone, and the daemon restarted, by `restore_cpu`.

A libvirtd does not always keep the cache: edited under a running daemon, about half the
restarts that followed a restore found the cache written anew over the edit (measured here,
libvirt 9.0). `edit_cache` edits with the daemon stopped, reads the files back once it runs
again, and edits again until the edit stays.
"""

from __future__ import annotations

import difflib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from lab.faults import start_libvirtd, stop_libvirtd
from lab.state import loaded

ORIGINAL_SUFFIX = ".drover-original"
_TCG_HOST_CPU = "<hostCPU type='tcg'"
# libvirtd sometimes writes its cache anew over the edit (measured: about half the restarts
# that followed a restore, editing under a running daemon); the edit is then made again.
EDIT_ATTEMPTS = 4
DIFF_LINES_SHOWN = 6  # of a rewrite that changed no validity field
# The cache file's fields libvirt compares with the host to decide whether to probe QEMU again.
_VALIDITY_FIELDS = (
    "qemuctime",
    "qemumoddirmtime",
    "selfctime",
    "selfvers",
    "microcodeVersion",
    "kernelVersion",
)

# An edit of one cache file's text: the new text, or None when the file has nothing to edit.
CacheEdit = Callable[[str], str | None]


def cache_dir(host: str) -> Path:
    """`host`'s own copy of libvirt's QEMU capabilities cache directory."""
    lab, _ = loaded()
    layout = lab.host(int(host.removeprefix("lab")))
    return layout.own_dir("/var/cache/libvirt") / "qemu" / "capabilities"


def edit_cache(host: str, edit: CacheEdit, what: str) -> None:
    """Apply `edit` to `host`'s cache files (each original kept beside it) and restart the
    daemon, until the edit survives the restart; raises if no file has `what` to edit, or
    if libvirtd rewrote its cache over the edit EDIT_ATTEMPTS times."""
    for _ in range(EDIT_ATTEMPTS):
        stop_libvirtd(host)  # a running daemon may save its cache at any time: edit it stopped
        edited = []
        for path in sorted(cache_dir(host).glob("*.xml")):
            text = path.read_text()
            changed = edit(text)
            if changed is None:
                continue
            backup = path.with_name(path.name + ORIGINAL_SUFFIX)
            if not backup.exists():
                shutil.copy2(path, backup)
            path.write_text(changed)
            edited.append((path, changed))
        start_libvirtd(host)  # it loads (or probes again and rewrites) its cache as it starts
        if not edited:
            raise RuntimeError(f"{host}: no cached {what} to withhold")
        rewritten = [(path, changed) for path, changed in edited if path.read_text() != changed]
        if not rewritten:
            return
    path, changed = rewritten[0]
    raise RuntimeError(
        f"{host}: libvirtd rewrote its cache over the edit {EDIT_ATTEMPTS} times "
        f"(last: {_validity_change(changed, path.read_text())})"
    )


def _validity_change(edited: str, written: str) -> str:
    """Which of the fields libvirt judges a cache file's validity by differ between the two
    texts: why libvirt probed QEMU again, said when the edit did not survive a restart. When
    none does, the first lines that differ say what libvirt wrote instead."""
    changed = []
    for field in _VALIDITY_FIELDS:
        before, after = _field(edited, field), _field(written, field)
        if before != after:
            changed.append(f"{field} {before} -> {after}")
    if changed:
        return "; ".join(changed)
    diff = difflib.unified_diff(edited.splitlines(), written.splitlines(), lineterm="", n=0)
    lines = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    shown = "; ".join(line.strip() for line in lines[:DIFF_LINES_SHOWN])
    return f"no validity field changed; {len(lines)} lines differ, first: {shown}"


def _field(text: str, name: str) -> str | None:
    match = re.search(rf"<{name}>([^<]*)</{name}>", text)
    return match.group(1) if match else None


def _without_feature(feature: str) -> CacheEdit:
    on = f"<property name='{feature}' type='boolean' value='true'"
    off = f"<property name='{feature}' type='boolean' value='false'"

    def edit(text: str) -> str | None:
        start = text.find(_TCG_HOST_CPU)
        if start < 0:
            return None
        end = text.index("</hostCPU>", start)
        if on not in text[start:end]:
            return None
        return text[:start] + text[start:end].replace(on, off) + text[end:]

    return edit


def withhold_cpu_feature(host: str, feature: str) -> None:
    """Make `host`'s libvirt see TCG's host CPU without `feature` (its cache edited, the
    daemon restarted); raises if the cache has no such feature to withhold."""
    edit_cache(host, _without_feature(feature), f"TCG host CPU offering {feature}")


def restore_cpu(host: str) -> None:
    """Put `host`'s capabilities cache back as libvirt wrote it and restart its daemon."""
    stop_libvirtd(host)
    for backup in cache_dir(host).glob("*.xml" + ORIGINAL_SUFFIX):
        backup.replace(backup.with_name(backup.name.removesuffix(ORIGINAL_SUFFIX)))
    start_libvirtd(host)
