"""What a producer asks for: the migration spec, validated before anything is queued.

The same model parses every task message on the worker side again (unknown fields rejected),
so a message that did not come from a validating producer never reaches libvirt.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

# A conservative subset of what libvirt accepts: no '/', no control characters, no spaces.
DOMAIN_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._+:@-]{0,199}$"
HOST_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
MAX_BANDWIDTH_MIB = 1_000_000

DomainName = Annotated[str, StringConstraints(pattern=DOMAIN_NAME_PATTERN)]
HostRef = Annotated[str, StringConstraints(pattern=HOST_NAME_PATTERN)]


class ControlFlow(StrEnum):
    """Who drives the migration (libvirt's migration guide, "communication control paths")."""

    P2P = "p2p"


class Transport(StrEnum):
    NATIVE = "native"


class MigrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: DomainName
    src: HostRef
    dst: HostRef
    live: bool = True
    control: ControlFlow = ControlFlow.P2P
    transport: Transport = Transport.NATIVE
    persistent: bool = False
    undefine_source: bool = False
    auto_converge: bool = False
    bandwidth_mib: int | None = Field(default=None, ge=1, le=MAX_BANDWIDTH_MIB)

    @model_validator(mode="after")
    def _coherent(self) -> MigrationSpec:
        if self.src == self.dst:
            raise ValueError(f"source and destination are the same host ({self.src})")
        return self


def first_error(exc: Exception) -> str:
    """One line out of a pydantic ValidationError (or any exception)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = re.sub(r"^Value error, ", "", str(err.get("msg", "")))
        if "pattern" in msg and where:
            msg = f"invalid {where} {err.get('input')!r}"
            return msg
        return f"{where}: {msg}" if where else msg
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
