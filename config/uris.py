"""What a registry libvirt URI may look like: an allowed transport and allowed parameters only.

A worker runs beside libvirtd as root and, in peer-to-peer mode, the source libvirtd opens the
destination's `peer_uri` itself. libvirt URIs can carry parameters that run programs or weaken
authentication (`command=` of the ext transport, `netcat=`, `keyfile=`, `no_verify=`,
`known_hosts=`, `pkipath=`; Nova bug 1276862), so the registry is checked when it is loaded:

- the scheme (driver+transport) must be on the operator's allowlist, `ALLOWED_SCHEMES` by
  default (`allowed_uri_schemes = [...]` at the top of drover.toml replaces it);
- every query parameter must be on the parameter allowlist, `ALLOWED_PARAMS` by default
  (`allowed_uri_params = [...]` replaces it). Only `socket` is allowed by default, and only on
  a local UNIX transport, where it names the libvirtd socket. Everything else is refused:
  `pkipath` too, since it moves the TLS trust anchors away from the files the operator
  installed in /etc/pki;
- no whitespace, control or non-ASCII characters, no password, no fragment, a host that is an
  IP address or DNS name, a port in range, and the path `/system` or `/session`.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from urllib.parse import parse_qsl, urlsplit

from config.addresses import MAX_PORT, check_address

ALLOWED_SCHEMES = frozenset({"qemu", "qemu+unix", "qemu+tcp", "qemu+tls", "qemu+ssh"})
ALLOWED_PARAMS = frozenset({"socket"})
LOCAL_SCHEMES = frozenset({"qemu", "qemu+unix"})
ALLOWED_PATHS = frozenset({"/system", "/session"})
MAX_URI_LENGTH = 512

_PASSWORD = re.compile(r"//([^/@]*):[^/@]*@")
_PRINTABLE_ASCII = re.compile(r"^[\x21-\x7e]+\Z")
_USER = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
_SOCKET_PATH = re.compile(r"^/[A-Za-z0-9._/-]{1,200}\Z")
# [0-9], never \d: \d matches every Unicode digit ("٤٩" would pass as a port).
_NETLOC = re.compile(
    r"^(?:(?P<user>[^@]*)@)?(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>[0-9]*))?\Z"
)


def redacted(uri: str) -> str:
    """`uri` with any password in its user part replaced by ***, for error messages."""
    return _PASSWORD.sub(r"//\1:***@", uri)


def check_libvirt_uri(
    uri: str,
    schemes: Collection[str] = ALLOWED_SCHEMES,
    params: Collection[str] = ALLOWED_PARAMS,
) -> str:
    """Return `uri` if it is a libvirt URI of an allowed form; else ValueError, one line."""
    if not uri or len(uri) > MAX_URI_LENGTH:
        raise ValueError(f"URI must be 1 to {MAX_URI_LENGTH} characters")
    shown = redacted(uri)
    if not _PRINTABLE_ASCII.match(uri):
        raise ValueError(f"URI {shown!r} has whitespace, control or non-ASCII characters")
    try:
        parts = urlsplit(uri)
    except ValueError:
        raise ValueError(f"URI {shown!r}: malformed host part") from None
    if parts.scheme not in schemes or not uri.startswith(f"{parts.scheme}://"):
        allowed = ", ".join(sorted(schemes))
        raise ValueError(f"URI {shown!r}: transport {parts.scheme!r} is not allowed ({allowed})")
    if parts.fragment or "#" in uri:
        raise ValueError(f"URI {shown!r} has a fragment")
    _check_netloc(shown, parts.netloc, local=parts.scheme == "qemu+unix")
    if parts.path not in ALLOWED_PATHS:
        raise ValueError(f"URI {shown!r}: path must be /system or /session")
    _check_query(shown, parts.query, parts.scheme, bool(parts.netloc), params)
    return uri


def _check_netloc(uri: str, netloc: str, *, local: bool) -> None:
    m = _NETLOC.match(netloc)
    if m is None:
        raise ValueError(f"URI {uri!r}: malformed host part")
    user, host, port = m.group("user"), m.group("host"), m.group("port")
    if user is not None and not _USER.match(user):
        raise ValueError(f"URI {uri!r}: user must be a plain name (no password)")
    if local and netloc:
        raise ValueError(f"URI {uri!r}: a qemu+unix URI takes no host")
    if host:
        try:
            check_address(host)
        except ValueError:
            raise ValueError(f"URI {uri!r}: host is not an IP address or DNS name") from None
    elif user is not None or port is not None:
        raise ValueError(f"URI {uri!r}: user or port without a host")
    if port is not None and not (port and 1 <= int(port) <= MAX_PORT):
        raise ValueError(f"URI {uri!r}: port out of range")


def _check_query(
    uri: str, query: str, scheme: str, has_host: bool, params: Collection[str]
) -> None:
    if not query:
        if "?" in uri:
            raise ValueError(f"URI {uri!r}: empty query")
        return
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"URI {uri!r}: malformed query") from None
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"URI {uri!r}: a parameter is repeated")
    for name, value in pairs:
        if name not in params:
            raise ValueError(f"URI {uri!r}: parameter {name!r} is not allowed")
        if name == "socket":
            if scheme not in LOCAL_SCHEMES or has_host:
                raise ValueError(f"URI {uri!r}: socket= needs a local qemu:// or qemu+unix://")
            if not _SOCKET_PATH.match(value) or ".." in value.split("/"):
                raise ValueError(f"URI {uri!r}: socket must be an absolute path")
