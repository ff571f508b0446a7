"""Compression of a live migration: libvirt's methods and their levels, as a job asks for them.

virsh's `--comp-methods xbzrle,mt,zlib,zstd`, `--comp-mt-level/-threads/-dthreads`,
`--comp-xbzrle-cache`, `--comp-zlib-level`, `--comp-zstd-level` map to
VIR_MIGRATE_PARAM_COMPRESSION (one entry per method) and VIR_MIGRATE_PARAM_COMPRESSION_*.
A job that names methods runs with exactly those (VIR_MIGRATE_COMPRESSED set with them); one
that says only `--compressed` gets the hypervisor's default (xbzrle), as before. A policy's
single `compression` method applies when the job names none (jobs/policy_choice.py).

The ranges are libvirt's and QEMU's own (libvirt-domain.h; QEMU's migrate-set-parameters):
a value outside them is refused here, before anything is queued. zlib and zstd are QEMU's
multifd compression: they need parallel connections, and QEMU takes one of them at a time.
What the host's libvirt can do is judged on the worker (worker/compression_support.py).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from config.policy_model import Compression

MAX_MT_LEVEL = 9  # QEMU compress-level: zlib's 0-9
MAX_MT_THREADS = 255  # QEMU compress-threads / decompress-threads: 1-255
MAX_ZLIB_LEVEL = 9  # VIR_MIGRATE_PARAM_COMPRESSION_ZLIB_LEVEL: 0-9
MAX_ZSTD_LEVEL = 20  # VIR_MIGRATE_PARAM_COMPRESSION_ZSTD_LEVEL: 0-20
MAX_XBZRLE_CACHE_MIB = 1_048_576  # a bound (1 TiB), not a recommendation: QEMU caps it at RAM
MULTIFD_METHODS = (Compression.ZLIB, Compression.ZSTD)
METHODS = tuple(m for m in Compression if m is not Compression.NONE)


class CompressionOptions(BaseModel):
    """The compression methods a job names and their tuning; each value only with its method.

    Strict as the request models around it (jobs/spec.py STRICT, not imported: spec imports
    this module): a level only as an int, so `mt_level=True` or `'3'` is refused instead of
    read as 1 or 3. Lax only where the CLI and a record's JSON spell it otherwise: the methods
    as a list of their words (each item still only a method's word).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    methods: tuple[Annotated[Compression, Strict(False)], ...] = Field(default=(), strict=False)
    mt_level: int | None = Field(default=None, ge=0, le=MAX_MT_LEVEL)
    mt_threads: int | None = Field(default=None, ge=1, le=MAX_MT_THREADS)
    mt_dthreads: int | None = Field(default=None, ge=1, le=MAX_MT_THREADS)
    xbzrle_cache_mib: int | None = Field(default=None, ge=1, le=MAX_XBZRLE_CACHE_MIB)
    zlib_level: int | None = Field(default=None, ge=0, le=MAX_ZLIB_LEVEL)
    zstd_level: int | None = Field(default=None, ge=0, le=MAX_ZSTD_LEVEL)

    @model_validator(mode="after")
    def _coherent(self) -> CompressionOptions:
        problems = option_problems(self)
        if problems:
            raise ValueError(problems[0])
        return self

    @property
    def multifd_method(self) -> Compression | None:
        """zlib or zstd when named: QEMU's multifd-compression."""
        return next((m for m in self.methods if m in MULTIFD_METHODS), None)

    @property
    def representative(self) -> Compression:
        """The one method a policy's single `compression` field shows for these options: the
        multifd one when named (so the policy's parallel-connections check applies)."""
        return self.multifd_method or self.methods[0]


# Each tuning value and the method it tunes (the CLI flag names the value in refusals).
_TUNES = (
    ("mt_level", "--comp-mt-level", Compression.MT),
    ("mt_threads", "--comp-mt-threads", Compression.MT),
    ("mt_dthreads", "--comp-mt-dthreads", Compression.MT),
    ("xbzrle_cache_mib", "--comp-xbzrle-cache", Compression.XBZRLE),
    ("zlib_level", "--comp-zlib-level", Compression.ZLIB),
    ("zstd_level", "--comp-zstd-level", Compression.ZSTD),
)


def option_problems(o: CompressionOptions) -> list[str]:
    """What libvirt would refuse, or silently ignore, in these options; each one line."""
    problems = [
        f"{flag} needs {method.value} in --comp-methods"
        for field, flag, method in _TUNES
        if getattr(o, field) is not None and method not in o.methods
    ]
    if not o.methods:
        problems.append("--comp-methods names no method (xbzrle, mt, zlib, zstd)")
    if Compression.NONE in o.methods:
        problems.append("--comp-methods: 'none' is not a method (leave out --comp-methods)")
    twice = [m.value for i, m in enumerate(o.methods) if m in o.methods[:i]]
    if twice:
        problems.append(f"--comp-methods names {twice[0]} twice")
    if all(m in o.methods for m in MULTIFD_METHODS):
        problems.append("--comp-methods: zlib and zstd exclude each other (QEMU takes one)")
    return problems


def compression_options(methods: str | None, **tuning: int | None) -> dict[str, object] | None:
    """A request's compression from the CLI's words: `methods` comma-separated; None when no
    compression option was given. Returned as a plain mapping for the producer's validating
    model (so a bad method name is refused there, in one line)."""
    given = {k: v for k, v in tuning.items() if v is not None}
    if methods is None and not given:
        return None
    names = [] if methods is None else [m.strip() for m in methods.split(",")]
    return {"methods": names, **given}
