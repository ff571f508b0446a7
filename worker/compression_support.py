"""A job's compression as libvirt parameters, and what this host's libvirt can do of it.

The parameters: one VIR_MIGRATE_PARAM_COMPRESSION entry per method (the Python binding turns
a list into repeated typed parameters), then each method's tuning. The zlib and zstd levels'
names are spelled out: they appeared in libvirt 9.4.0, and a binding built for an older
libvirt has no constant for them.

What the host can do is read from its libvirtd's own version (virConnectGetLibVersion), not
guessed from the binding: the lab's daemon is libvirt 9.0.0, whose QEMU driver knows only
xbzrle and mt ("Unsupported compression method" is what it would answer, after the
destination had already been prepared). Each method's first libvirt release is from
libvirt-domain.h's "Since" tags. QEMU 7.2 (the lab's) has them all (multifd zlib/zstd
since QEMU 5.0), and libvirt itself checks QEMU's migration capabilities at the call.
"""

from __future__ import annotations

from typing import Any

import libvirt

from config.policy_model import Compression
from jobs.compression import CompressionOptions

MIB = 1024 * 1024
PARAM_COMPRESSION = libvirt.VIR_MIGRATE_PARAM_COMPRESSION
PARAM_MT_LEVEL = "compression.mt.level"
PARAM_MT_THREADS = "compression.mt.threads"
PARAM_MT_DTHREADS = "compression.mt.dthreads"
PARAM_XBZRLE_CACHE = "compression.xbzrle.cache"
PARAM_ZLIB_LEVEL = "compression.zlib.level"  # VIR_MIGRATE_PARAM_COMPRESSION_ZLIB_LEVEL
PARAM_ZSTD_LEVEL = "compression.zstd.level"  # VIR_MIGRATE_PARAM_COMPRESSION_ZSTD_LEVEL

# libvirt's version numbers: major * 1,000,000 + minor * 1,000 + release.
LIBVIRT_1_3_4 = 1_003_004
LIBVIRT_9_4_0 = 9_004_000
METHOD_SINCE = {
    Compression.XBZRLE: LIBVIRT_1_3_4,
    Compression.MT: LIBVIRT_1_3_4,
    Compression.ZLIB: LIBVIRT_9_4_0,
    Compression.ZSTD: LIBVIRT_9_4_0,
}
PARAM_SINCE = {
    PARAM_MT_LEVEL: LIBVIRT_1_3_4,
    PARAM_MT_THREADS: LIBVIRT_1_3_4,
    PARAM_MT_DTHREADS: LIBVIRT_1_3_4,
    PARAM_XBZRLE_CACHE: LIBVIRT_1_3_4,
    PARAM_ZLIB_LEVEL: LIBVIRT_9_4_0,
    PARAM_ZSTD_LEVEL: LIBVIRT_9_4_0,
}


def compression_params(o: CompressionOptions) -> dict[str, Any]:
    """The migration parameters for `o` (typed as libvirt expects: ints, the cache in bytes)."""
    params: dict[str, Any] = {PARAM_COMPRESSION: [m.value for m in o.methods]}
    for name, value in (
        (PARAM_MT_LEVEL, o.mt_level),
        (PARAM_MT_THREADS, o.mt_threads),
        (PARAM_MT_DTHREADS, o.mt_dthreads),
        (PARAM_ZLIB_LEVEL, o.zlib_level),
        (PARAM_ZSTD_LEVEL, o.zstd_level),
    ):
        if value is not None:
            params[name] = value
    if o.xbzrle_cache_mib is not None:
        params[PARAM_XBZRLE_CACHE] = o.xbzrle_cache_mib * MIB
    return params


def version_text(version: int) -> str:
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"


def unsupported(params: dict[str, Any], lib_version: int, host: str) -> str | None:
    """Why libvirt `lib_version` on `host` cannot run a call with `params`; None if it can.
    One line, naming the first method or parameter it lacks and the release that has it."""
    named = params.get(PARAM_COMPRESSION, [])
    methods = [named] if isinstance(named, str) else list(named)
    needs = [(f"compression method {m}", METHOD_SINCE[Compression(m)]) for m in methods]
    needs += [(f"parameter {p}", since) for p, since in PARAM_SINCE.items() if p in params]
    for what, since in needs:
        if lib_version < since:
            return (
                f"libvirt {version_text(lib_version)} on {host} does not support {what} "
                f"(needs libvirt >= {version_text(since)}); nothing moved"
            )
    return None
