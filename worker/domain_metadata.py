"""What an operator tells drover about a domain in the domain's own XML, as libvirt metadata.

One element in drover's namespace, its attributes read here and nowhere else:

    virsh metadata DOMAIN --uri https://drover.dev/xmlns/placement/1 --key drover \\
          --set '<placement group="web" policy="db"/>'

`group` is the anti-affinity group (worker/placement.py, and the destination's own check in
its prepare: `running_in_group`); `policy` the migration policy (jobs/policy_choice.py),
checked against the registry's policies where it is used.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET

from worker.libvirt_host import (
    Connection,
    Domain,
    LibvirtError,
    is_gone,
    list_domains,
    metadata_element,
)

PLACEMENT_NS = "https://drover.dev/xmlns/placement/1"
GROUP_ATTRIBUTE = "group"
POLICY_ATTRIBUTE = "policy"


def drover_attribute(dom: Domain, name: str) -> str | None:
    """Attribute `name` of the domain's drover metadata element; None when it has none."""
    raw = metadata_element(dom, PLACEMENT_NS)
    if raw is None:
        return None
    with contextlib.suppress(ET.ParseError):
        return ET.fromstring(raw).get(name) or None
    return None


def anti_affinity_group(dom: Domain) -> str | None:
    return drover_attribute(dom, GROUP_ATTRIBUTE)


def policy_name(dom: Domain) -> str | None:
    return drover_attribute(dom, POLICY_ATTRIBUTE)


def running_in_group(conn: Connection, group: str, excluding_uuid: str) -> list[str]:
    """The names of the domains running on `conn`'s libvirtd in anti-affinity `group`, but the
    one with `excluding_uuid` (the guest that is arriving: itself is no neighbour).

    One listing and one metadata read per running domain, on the host's own libvirtd: what
    the host's published facts say of its groups can be rewritten by anyone with the Redis
    password. A domain gone between the listing and the look is passed over; any other error
    is raised (an unknown group is never read as none)."""
    names = []
    for dom in list_domains(conn, active_only=True):
        try:
            if dom.UUIDString() != excluding_uuid and anti_affinity_group(dom) == group:
                names.append(str(dom.name()))
        except LibvirtError as exc:
            if not is_gone(exc):
                raise
    return sorted(names)
