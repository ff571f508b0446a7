"""`--xml` / `--persistent-xml`: the rules a domain XML given for the destination must follow.

libvirt itself lets the destination XML differ from the guest's only where the guest cannot
tell (ABI stability); the host-side parts it leaves free are exactly what a tampered request
would use: another emulator binary, `qemu:commandline` passthrough, a disk path anywhere on the
destination. drover narrows them. Compared with the XML the source's libvirtd shows for the
guest (migratable form), a given XML may differ only in:

- `<title>`, `<description>` and `<metadata>` (documentation; nothing reaches QEMU);
- the source path of a file-backed disk, to a plain path under the destination's registry
  `storage_dirs`.

Everything else must be identical (whitespace and attribute order aside), and the name must
be the one the guest arrives with, the UUID and domain type the guest's own. The producer can
check the form and the name (`form_problem`); the workers check all of it against libvirt
(`check_against_guest`), since a job record is not trusted. Pure: no libvirt, no file system.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import PurePosixPath

# A real domain XML is a few KiB; 256 KiB leaves room for large device lists and bounds what a
# request may carry through Redis and into libvirt.
MAX_DOMAIN_XML_CHARS = 262_144
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
FREE_ELEMENTS = ("title", "description", "metadata")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}\Z")
_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9._+@:/-]{1,4000}\Z")
_DECLARATION = re.compile(r"<!(DOCTYPE|ENTITY)", re.IGNORECASE)


class DomainXMLError(ValueError):
    """A domain XML drover will not pass to libvirt; one line."""


@dataclass(frozen=True)
class XMLCheck:
    """What an accepted XML changes: file disk paths, guest path -> path on arrival."""

    disk_moves: dict[str, str] = field(default_factory=dict)


def parse(text: str, what: str) -> ET.Element:
    """The <domain> element of `text`, or DomainXMLError: too big, a DTD, not XML, not a domain."""
    if len(text) > MAX_DOMAIN_XML_CHARS:
        raise DomainXMLError(f"{what} is over {MAX_DOMAIN_XML_CHARS} characters")
    if _DECLARATION.search(text):
        raise DomainXMLError(f"{what} declares a DOCTYPE or entities (refused)")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise DomainXMLError(f"{what} is not well-formed XML: {exc}") from None
    if root.tag != "domain":
        raise DomainXMLError(f"{what}: the root element is <{root.tag}>, not <domain>")
    return root


def _text(root: ET.Element, tag: str) -> str | None:
    found = root.find(tag)
    return None if found is None or found.text is None else found.text.strip()


def _uuid(value: str | None) -> str | None:
    return None if value is None else value.replace("-", "").lower()


def form_problem(text: str, what: str, arrives_as: str) -> str | None:
    """What the producer can check without libvirt: a domain XML named `arrives_as` (the
    guest's name, or its --dname) with a UUID; the UUID's value is the workers' to check."""
    try:
        root = parse(text, what)
    except DomainXMLError as exc:
        return str(exc)
    name = _text(root, "name")
    if name != arrives_as:
        return f"{what} names the guest {name!r}; it must be {arrives_as!r} (its name or --dname)"
    uuid = _text(root, "uuid")
    if uuid is None or not _UUID.match(uuid):
        return f"{what} must carry the guest's <uuid>"
    return None


def path_allowed(path: str, dirs: list[str]) -> bool:
    """`path` is a plain absolute path strictly under one of `dirs` (no `..`; compared as
    written: the destination's worker resolves links again before it creates anything)."""
    if not _PLAIN_PATH.match(path) or ".." in path.split("/"):
        return False
    target = PurePosixPath(path)
    return any(target != PurePosixPath(d) and target.is_relative_to(d) for d in dirs)


def check_against_guest(
    proposed: str, current: str, what: str, arrives_as: str, disk_dirs: list[str]
) -> XMLCheck:
    """Check `proposed` against the guest's `current` XML (as its source's libvirtd shows it);
    the disk moves it makes, or DomainXMLError naming the first thing refused."""
    new, old = parse(proposed, what), parse(current, "the guest's XML")
    name = _text(new, "name")
    if name != arrives_as:
        raise DomainXMLError(f"{what} renames the guest to {name!r}; it arrives as {arrives_as!r}")
    if _uuid(_text(new, "uuid")) != _uuid(_text(old, "uuid")):
        raise DomainXMLError(f"{what} gives the guest another UUID ({_text(new, 'uuid')})")
    if new.get("type") != old.get("type"):
        raise DomainXMLError(
            f"{what} changes the domain type from {old.get('type')!r} to {new.get('type')!r}"
        )
    _strip_free(new)
    _strip_free(old)
    _refuse_namespaces(new, what)
    if _text(new, "devices/emulator") != _text(old, "devices/emulator"):
        raise DomainXMLError(f"{what} changes the emulator to {_text(new, 'devices/emulator')!r}")
    moves = _disk_moves(new, old, what, disk_dirs)
    where = _first_difference(new, old, "domain")
    if where is not None:
        raise DomainXMLError(
            f"{what} changes {where}; drover allows only title, description, metadata and "
            "file disk paths under the destination's storage directories"
        )
    return XMLCheck(disk_moves=moves)


def _strip_free(root: ET.Element) -> None:
    """Drop what may differ freely, and the name (checked apart) and live-only `id`."""
    for tag in FREE_ELEMENTS:
        for found in root.findall(tag):
            root.remove(found)
    for found in root.findall("name"):
        root.remove(found)
    root.attrib.pop("id", None)


def _refuse_namespaces(root: ET.Element, what: str) -> None:
    for el in root.iter():
        if el.tag.startswith(f"{{{QEMU_NAMESPACE}}}"):
            local = el.tag.split("}", 1)[1]
            raise DomainXMLError(f"{what} carries qemu:{local} (QEMU passthrough is refused)")
        if el.tag.startswith("{") or any(k.startswith("{") for k in el.attrib):
            raise DomainXMLError(f"{what} carries a foreign XML namespace outside <metadata>")


def _file_disks(root: ET.Element) -> list[ET.Element]:
    return [d for d in root.findall("devices/disk") if d.get("type") == "file"]


def _disk_moves(new: ET.Element, old: ET.Element, what: str, dirs: list[str]) -> dict[str, str]:
    """Pair file disks by position; a changed source file must be under `dirs`. The paths are
    then made equal so the general comparison sees the rest of each disk."""
    moves: dict[str, str] = {}
    for was, now in zip(_file_disks(old), _file_disks(new), strict=False):
        src_was, src_now = was.find("source"), now.find("source")
        if src_was is None or src_now is None:
            continue
        before, after = src_was.get("file"), src_now.get("file")
        if before is None or after is None or before == after:
            continue
        if not path_allowed(after, dirs):
            shown = ", ".join(dirs) or "none"
            raise DomainXMLError(
                f"{what} puts disk {before} at {after!r}, outside the destination's "
                f"storage directories ({shown})"
            )
        moves[before] = after
        src_now.set("file", before)
    return moves


def _attrs(el: ET.Element) -> dict[str, str]:
    return {k: v.strip() for k, v in el.attrib.items()}


def _first_difference(a: ET.Element, b: ET.Element, path: str) -> str | None:
    """The path of the first element where `a` and `b` differ (tag, attributes, text or
    children, in order), or None when they are the same tree."""
    if a.tag != b.tag or _attrs(a) != _attrs(b) or (a.text or "").strip() != (b.text or "").strip():
        return path
    kids_a, kids_b = list(a), list(b)
    seen: dict[str, int] = {}
    for i in range(max(len(kids_a), len(kids_b))):
        kid = kids_a[i] if i < len(kids_a) else kids_b[i]
        seen[kid.tag] = seen.get(kid.tag, 0) + 1
        here = f"{path}/{kid.tag}[{seen[kid.tag]}]"
        if i >= len(kids_a) or i >= len(kids_b):
            return here
        found = _first_difference(kids_a[i], kids_b[i], here)
        if found is not None:
            return found
    return None
