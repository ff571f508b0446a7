"""The CLI options a drain shares with `drover migrate` (jobs/drain_options.py), spelled once:
`drover evacuate` and `drover schedule add evacuate` take the same set, `drover migrate` the
compression ones. Typer reads these annotations; `drain_request` turns the values into the
request fields the validating models expect (nothing dropped: an unknown method, a level out
of range or a bad combination is refused there, in one line)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer

CompMethods = Annotated[
    str | None,
    typer.Option("--comp-methods", help="xbzrle,mt,zlib,zstd (zlib/zstd need --parallel)"),
]
CompMtLevel = Annotated[int | None, typer.Option("--comp-mt-level", help="mt: 0-9")]
CompMtThreads = Annotated[int | None, typer.Option("--comp-mt-threads", help="mt: 1-255")]
CompMtDthreads = Annotated[int | None, typer.Option("--comp-mt-dthreads", help="mt: 1-255")]
CompXbzrleCache = Annotated[
    int | None, typer.Option("--comp-xbzrle-cache", help="xbzrle cache, MiB")
]
CompZlibLevel = Annotated[int | None, typer.Option("--comp-zlib-level", help="zlib: 0-9")]
CompZstdLevel = Annotated[int | None, typer.Option("--comp-zstd-level", help="zstd: 0-20")]
Tls = Annotated[bool, typer.Option("--tls", help="QEMU native migration TLS")]
CopyStorage = Annotated[
    str | None, typer.Option("--copy-storage", help="all|inc: copy guests' local disks")
]
Parallel = Annotated[int | None, typer.Option("--parallel", help="parallel connections")]
Compressed = Annotated[bool, typer.Option("--compressed")]
Tunnelled = Annotated[bool, typer.Option("--tunnelled")]
AutoConverge = Annotated[bool, typer.Option("--auto-converge")]
Bandwidth = Annotated[int | None, typer.Option("--bandwidth", help="MiB/s cap")]
CompletionTimeout = Annotated[
    int | None, typer.Option("--completion-timeout", help="seconds each migration may take")
]
TimeoutActionOpt = Annotated[
    str | None, typer.Option("--timeout-action", help="then: suspend (default) | postcopy | abort")
]


def compression_request(
    methods: str | None,
    mt_level: int | None,
    mt_threads: int | None,
    mt_dthreads: int | None,
    xbzrle_cache: int | None,
    zlib_level: int | None,
    zstd_level: int | None,
) -> dict[str, object] | None:
    """The request's `compression` field (None when no --comp-* option was given)."""
    from jobs.compression import compression_options

    return compression_options(
        methods,
        mt_level=mt_level,
        mt_threads=mt_threads,
        mt_dthreads=mt_dthreads,
        xbzrle_cache_mib=xbzrle_cache,
        zlib_level=zlib_level,
        zstd_level=zstd_level,
    )


def drain_request(
    *,
    tunnelled: bool,
    auto_converge: bool,
    bandwidth: int | None,
    completion_timeout: int | None,
    timeout_action: str | None,
    policy: str | None,
    tls: bool,
    copy_storage: str | None,
    parallel: int | None,
    compressed: bool,
    compression: dict[str, object] | None,
) -> dict[str, Any]:
    """The DrainOptions fields of a request, from the CLI's values."""
    return {
        "tunnelled": tunnelled,
        "auto_converge": auto_converge,
        "bandwidth_mib": bandwidth,
        "completion_timeout_s": completion_timeout,
        "timeout_action": timeout_action,
        "policy": policy,
        "tls": tls,
        "copy_storage": copy_storage,
        "parallel": parallel,
        "compressed": compressed,
        "compression": compression,
    }


# The commands' parameter names for the options above (migrate, evacuate and schedule add
# name them alike), so each command hands its arguments over whole: `...(locals())`.
COMPRESSION_ARGS = (
    "comp_methods",
    "comp_mt_level",
    "comp_mt_threads",
    "comp_mt_dthreads",
    "comp_xbzrle_cache",
    "comp_zlib_level",
    "comp_zstd_level",
)
DRAIN_ARGS = (
    "tunnelled",
    "auto_converge",
    "bandwidth",
    "completion_timeout",
    "timeout_action",
    "policy",
    "tls",
    "copy_storage",
    "parallel",
    "compressed",
)


def compression_request_of(args: Mapping[str, Any]) -> dict[str, object] | None:
    """`compression_request` from a command's arguments, named as COMPRESSION_ARGS."""
    return compression_request(*(args[name] for name in COMPRESSION_ARGS))


def drain_request_of(args: Mapping[str, Any]) -> dict[str, Any]:
    """`drain_request` from a command's arguments, named as DRAIN_ARGS and COMPRESSION_ARGS."""
    return drain_request(
        **{name: args[name] for name in DRAIN_ARGS}, compression=compression_request_of(args)
    )
