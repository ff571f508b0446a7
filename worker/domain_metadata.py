"""What an operator tells drover about a domain in the domain's own XML, as libvirt metadata.

One element in drover's namespace, its attributes read here and nowhere else:

    virsh metadata DOMAIN --uri https://drover.dev/xmlns/placement/1 --key drover \\
          --set '<placement group="web" policy="db"/>'

`group` is the anti-affinity group (worker/placement.py); `policy` the migration policy
(jobs/policy_choice.py), checked against the registry's policies where it is used.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET

from worker.libvirt_host import Domain, metadata_element

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
