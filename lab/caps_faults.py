"""Lab fault: a running guest whose QEMU, as its host's libvirt records it, lacks a capability.

When libvirt starts a guest it copies the `<flag name='...'/>` lines of its QEMU capabilities
into the guest's status record (/run/libvirt/qemu/NAME.xml, the host's own copy in the lab),
and from then on judges that guest by the record, not by the capabilities cache: a restarted
libvirtd reads the record back and keeps its flags (libvirt 9.0 probes again only for a record
that has none). Dropping a flag from a running guest's record, with its daemon stopped, makes
that guest, for libvirt, one running on a QEMU without the capability.

With `migration-file-drop-cache` withheld, libvirt 9.0 refuses to migrate such a guest whose
disk on shared storage (not a cluster file system) uses a host-cached mode: "Migration may
lead to data corruption if disks use cache other than none or directsync".

Why the record and not the capabilities cache (lab/cpu_faults.py's way for a CPU feature): CI
saw a restarted libvirtd probe QEMU again and write its cache over a dropped flag four times
in a row, with the edit made while the daemon was stopped; that never happened on the machine
that wrote the fault. The record is only read back, never probed again.
"""

from __future__ import annotations

from pathlib import Path

import libvirt

from lab.faults import start_libvirtd, stop_libvirtd
from lab.state import loaded


def status_record(host: str, domain: str) -> Path:
    """`host`'s libvirt status record of its running guest `domain`."""
    lab, _ = loaded()
    layout = lab.host(int(host.removeprefix("lab")))
    return layout.own_dir("/run/libvirt") / "qemu" / f"{domain}.xml"


def _flag_line(flag: str) -> str:
    return f"<flag name='{flag}'/>"


def recorded_flag(host: str, domain: str, flag: str) -> bool:
    """Whether `host`'s libvirt records capability `flag` for its running guest `domain`."""
    return any(ln.strip() == _flag_line(flag) for ln in status_record(host, domain).open())


def withhold_guest_flag(host: str, domain: str, flag: str, uri: str) -> None:
    """Drop `flag` from the status record of `domain`, running on `host` (reached at `uri`):
    the daemon is stopped, the record edited, the daemon started and the guest's record read
    back once libvirt has taken the guest up again. Raises if the record has no such flag, or
    if libvirt wrote it back."""
    path = status_record(host, domain)
    stop_libvirtd(host)
    try:
        text = path.read_text()
        kept = [ln for ln in text.splitlines(keepends=True) if ln.strip() != _flag_line(flag)]
        if len(kept) == len(text.splitlines()):
            raise RuntimeError(f"{host}: {domain}'s status record has no {flag} to withhold")
        path.write_text("".join(kept))
    finally:
        start_libvirtd(host)
    conn = libvirt.open(uri)
    try:
        # A call that takes a job on the guest waits for libvirt's reconnection to it, which
        # saves the record again; what it saved is what libvirt now holds.
        conn.lookupByName(domain).memoryStats()
    finally:
        conn.close()
    if recorded_flag(host, domain, flag):
        raise RuntimeError(f"{host}: libvirt recorded {flag} for {domain} again on restart")
