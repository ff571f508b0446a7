"""Lab fault: a host whose QEMU lacks a capability libvirt probes for (a `<flag>` of its cache).

libvirt records what each QEMU binary can do in its per-host capabilities cache
(/var/cache/libvirt/qemu/capabilities/*.xml, the host's own copy in the lab) as
`<flag name='...'/>` lines, and keeps a cache whose QEMU binary and libvirt version still
match when its daemon restarts (lab/cpu_faults.py relies on the same). A guest started after
a flag was dropped from that cache runs, for libvirt, on a QEMU without that capability: its
status record (/run/libvirt/qemu/NAME.xml) carries the cache's flags without it, and libvirt
judges the guest by them. Guests already running keep the flags they were started with.

With `migration-file-drop-cache` withheld, libvirt 9.0 refuses to migrate such a guest whose
disk on shared storage (not a cluster file system) uses a host-cached mode: "Migration may
lead to data corruption if disks use cache other than none or directsync". `restore_caps`
puts the cache back as libvirt wrote it and restarts the daemon.
"""

from __future__ import annotations

from collections.abc import Callable

from lab.cpu_faults import cache_dir, edit_cache, restore_cpu


def _without_flag(flag: str) -> Callable[[str], str | None]:
    line = f"<flag name='{flag}'/>"

    def edit(text: str) -> str | None:
        if line not in text:
            return None
        return "".join(ln for ln in text.splitlines(keepends=True) if ln.strip() != line)

    return edit


def withhold_qemu_flag(host: str, flag: str) -> None:
    """Make `host`'s libvirt see its QEMU without capability `flag` (its cache edited, the
    daemon restarted); raises if no cache file offers the flag."""
    edit_cache(host, _without_flag(flag), f"QEMU capability {flag}")


def has_qemu_flag(host: str, flag: str) -> bool:
    """Whether any of `host`'s cached QEMU capabilities offers `flag`."""
    line = f"<flag name='{flag}'/>"
    return any(line in p.read_text() for p in cache_dir(host).glob("*.xml"))


def restore_caps(host: str) -> None:
    """Put `host`'s capabilities cache back as libvirt wrote it and restart its daemon (the
    same undo as lab/cpu_faults.py's: every edited cache file has its original beside it)."""
    restore_cpu(host)
