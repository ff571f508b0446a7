"""Maintenance mode: a disabled host is never chosen, or accepted, as a destination.

Kept in Redis beside the jobs so that producers (which refuse at submit), planners (which
never place on it) and the destination's own worker (which refuses in prepare, for jobs queued
before the host was disabled) all read the same answer. The host's worker also remembers that
it saw its host disabled, until it reads an enable a trusted key signed after that
(worker/maintenance_kept.py): an entry deleted by hand puts no guest on a host in maintenance.
"""

from __future__ import annotations

from typing import cast

import redis
from pydantic import BaseModel

from jobs.keys import DISABLED_HOSTS, ENABLED_HOSTS
from jobs.request_signing import REQUEST_FIELD, RequestSigner, signed_record
from jobs.store import now

__all__ = ["DISABLED_HOSTS", "Disabled", "Maintenance", "reason_problem"]
# A reason is a note for people (`drover hosts`, the refusal a producer prints), not a log.
MAX_REASON_CHARS = 200
UNKNOWN = "unknown"
UNREADABLE_ENTRY = "its maintenance entry in Redis cannot be read"
ENABLE_KIND = "host-enable"  # what a signed `drover host enable` is


class HostEnable(BaseModel):
    """What `drover host enable` signs: the host put back in placement."""

    host: str


def reason_problem(reason: str) -> str | None:
    """Why `reason` may not be kept as a host's maintenance reason, or None.

    Printable text only, on one line: the reason is printed in terminals, by `drover hosts`
    and in every refusal to place a guest there, where an escape sequence would act instead
    of being read (OSC 52 sets the clipboard, CSI moves the cursor or clears the screen) and
    a newline would forge a line of output.
    """
    if not reason.strip():
        return "the maintenance reason (--reason) is empty"
    if len(reason) > MAX_REASON_CHARS:
        return (
            f"the maintenance reason (--reason) is {len(reason)} characters; "
            f"at most {MAX_REASON_CHARS}"
        )
    for position, char in enumerate(reason, start=1):
        if not char.isprintable():
            return (
                f"the maintenance reason (--reason) must be printable text on one line: "
                f"character {position} is {char!r}"
            )
    return None


class Disabled(BaseModel):
    since: str
    reason: str
    by: str


def _entry(raw: str) -> Disabled:
    """A host's entry; one drover did not write still disables the host (someone meant to,
    and placing guests on it is the harm to avoid), instead of failing every planner and
    destination check that reads the hash."""
    try:
        return Disabled.model_validate_json(raw)
    except ValueError:
        return Disabled(since=UNKNOWN, reason=UNREADABLE_ENTRY, by=UNKNOWN)


class Maintenance:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def disable(self, host: str, reason: str, by: str) -> Disabled:
        """Take `host` out of placement; a host already disabled keeps its first reason."""
        entry = Disabled(since=now().isoformat(), reason=reason, by=by)
        self.r.hsetnx(DISABLED_HOSTS, host, entry.model_dump_json())
        current = self.disabled_entry(host)
        assert current is not None
        return current

    def enable(self, host: str, signer: RequestSigner | None = None, by: str = UNKNOWN) -> bool:
        """Put `host` back in placement; False when it was not disabled. With signing on, the
        signed enable is kept for the host's worker (it is what the worker believes)."""
        signed = signed_record(
            signer, kind=ENABLE_KIND, job_id=host, spec=HostEnable(host=host), origin=by, at=now()
        )
        with self.r.pipeline(transaction=True) as p:
            if signed:
                p.hset(ENABLED_HOSTS, host, signed[REQUEST_FIELD])
            p.hdel(DISABLED_HOSTS, host)
            return bool(p.execute()[-1])

    def signed_enable(self, host: str) -> str | None:
        """The last signed `drover host enable` of `host` (as written: checked by its reader)."""
        return cast(str | None, self.r.hget(ENABLED_HOSTS, host))

    def disabled_entry(self, host: str) -> Disabled | None:
        raw = cast(str | None, self.r.hget(DISABLED_HOSTS, host))
        return _entry(raw) if raw else None

    def disabled(self) -> dict[str, Disabled]:
        raw = cast(dict[str, str], self.r.hgetall(DISABLED_HOSTS))
        return {host: _entry(v) for host, v in raw.items()}

    def refusal(self, host: str) -> str | None:
        """Why `host` may not receive a guest now, or None."""
        entry = self.disabled_entry(host)
        if entry is None:
            return None
        return (
            f"{host} is disabled for maintenance since {entry.since} ({entry.reason}); "
            f"`drover host enable {host}` puts it back"
        )
