"""What a libvirt error says: the daemon is gone (or frozen), the domain is gone, or neither
(the request itself was wrong). Callers decide on these whether to retry, reconnect or fail.
"""

from __future__ import annotations

import libvirt

# What libvirt says when keepalive gave up on a daemon that stopped answering.
KEEPALIVE_TIMEOUT = "keepalive timeout"
# Errors that mean "the daemon is not there (any more)", not "the request was wrong".
_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
}


def is_connection_error(exc: libvirt.libvirtError) -> bool:
    """The daemon is not there (any more), or stopped answering: not the request's fault."""
    message = exc.get_error_message() or ""
    closed = "client socket is closed" in message or is_keepalive_timeout(exc)
    return closed or exc.get_error_code() in _CONNECTION_ERRORS


def is_stale_connection(exc: libvirt.libvirtError) -> bool:
    """A kept connection's error that a fresh connection would not meet: its daemon
    restarted. Not a keepalive timeout: that daemon is frozen, and a fresh one would wait on
    it again (worker/peer_connections.py)."""
    return is_connection_error(exc) and not is_keepalive_timeout(exc)


def is_keepalive_timeout(exc: libvirt.libvirtError) -> bool:
    """libvirt closed the connection because its daemon stopped answering (a frozen peer):
    an internal error by its code, "connection closed due to keepalive timeout" (lab)."""
    return KEEPALIVE_TIMEOUT in (exc.get_error_message() or "")


def is_gone(exc: libvirt.libvirtError) -> bool:
    """The domain left since it was listed or looked up (undefined, or migrated away)."""
    return bool(exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN)
