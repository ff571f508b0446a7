"""Whether this host is in maintenance, as its worker holds it: what Redis says, and what
this worker saw before.

A disabled host's entry lives in Redis, where anyone with the password can delete it: a
guest would then land on a host in maintenance (the attacker probe: a migration queued, the
host disabled, the entry deleted; the guest arrived). So the worker keeps, in its ledger,
when it last saw its host disabled (at each keeper tick, and at a destination's prepare), and
holds the host disabled until it reads a `drover host enable` that a trusted key signed after
that: an enable signed before a later disable (the worker away in between) ends nothing.
With signing off (a lab) a deleted entry is an enable, as before.

What remains: an entry deleted before this worker first looked (a keeper tick,
`heartbeat_interval`) is never seen; and an enable signed up to `host_facts_max_skew` before
the worker's last look still counts (the clocks of two machines).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from config.events import get_logger
from jobs.maintenance import ENABLE_KIND, HostEnable, Maintenance
from jobs.request_signing import SECURITY_REASON, RequestRefused, check_record, verifier_for
from worker.runtime import Runtime

log = get_logger()
_SAID: set[tuple[str, str]] = set()  # (host, seen) whose kept maintenance was said


def maintenance_refusal(rt: Runtime) -> str | None:
    """Why this host may not receive a guest now (Redis's entry, or the one it kept)."""
    maintenance = Maintenance(rt.store.r)
    refusal = maintenance.refusal(rt.host)
    if refusal is not None:
        rt.ledger.note_disabled(rt.host, datetime.now(UTC))
        return refusal
    seen = rt.ledger.disabled_since(rt.host)
    if seen is None:
        return None
    why = _not_enabled(rt, maintenance, seen)
    if why is None:
        rt.ledger.forget_disabled(rt.host)
        return None
    kept = (
        f"{rt.host} is disabled for maintenance: its worker saw it so at "
        f"{seen:%Y-%m-%d %H:%M:%S}Z, and its entry was removed without a signed "
        f"`drover host enable {rt.host}` ({why})"
    )
    if (rt.host, seen.isoformat()) not in _SAID:
        _SAID.add((rt.host, seen.isoformat()))
        log.error("security.rejected", reason=f"{SECURITY_REASON}: {kept}")
    return kept


def remember_maintenance(rt: Runtime) -> None:
    """The keeper's duty: look, so that a disable is kept from the first tick it is seen."""
    maintenance_refusal(rt)


def _not_enabled(rt: Runtime, maintenance: Maintenance, seen: datetime) -> str | None:
    """Why no enable counts since `seen`; None when one does."""
    verifier = verifier_for(rt.settings.security)
    if verifier is None:
        return None
    raw = maintenance.signed_enable(rt.host)
    if raw is None:
        return "none was written"
    try:
        request = check_record(
            verifier, raw, rt.host, kind=ENABLE_KIND, spec=HostEnable(host=rt.host)
        )
    except RequestRefused as exc:
        return f"the one in Redis: {exc}"
    assert request is not None  # a verifier always returns the request
    skew = timedelta(seconds=rt.settings.tunables.host_facts_max_skew)
    if request.at + skew < seen:
        return f"the one in Redis was signed at {request.at:%Y-%m-%d %H:%M:%S}Z, before"
    return None
