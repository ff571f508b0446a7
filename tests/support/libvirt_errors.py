"""libvirt errors as libvirt raises them, with a code, for scripted stand-ins of a domain or
a connection in unit tests (the lab raises real ones)."""

from __future__ import annotations

import libvirt


def libvirt_error(
    code: int, message: str, origin: int = libvirt.VIR_FROM_RPC
) -> libvirt.libvirtError:
    """A libvirtError whose get_error_code() is `code` (from `origin`, a VIR_FROM_*)."""
    exc = libvirt.libvirtError(message)
    exc.err = (code, origin, message, libvirt.VIR_ERR_ERROR, "", "", "", 0, 0)
    return exc
