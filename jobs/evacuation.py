"""An evacuation: empty one host onto others, as a job of its own with child migrations.

    queued -> planning -> running -> drained | partial | cancelled
                       -> planned   (a dry run: the plan, nothing queued)
    any live state     -> failed    (the plan itself could not be made)

The source host's worker plans (it alone reads the host's domains), queues one child
migration per placed domain, and watches the children (worker/evacuation.py). `drained` is
said only after libvirt on the source confirms that no domain the evacuation had to move is
left there; anything else ends `partial`, each domain left behind listed with its reason.
"""

from __future__ import annotations

import secrets
from typing import Any, cast

from config.addresses import shown
from jobs.abort_request import abort_fields
from jobs.evacuation_model import EVACUATION_KIND as EVACUATION_KIND
from jobs.evacuation_model import EVACUATION_TERMINAL as EVACUATION_TERMINAL
from jobs.evacuation_model import MAX_PARALLEL as MAX_PARALLEL
from jobs.evacuation_model import Children as Children
from jobs.evacuation_model import DomainOutcome as DomainOutcome
from jobs.evacuation_model import Evacuation as Evacuation
from jobs.evacuation_model import EvacuationSpec as EvacuationSpec
from jobs.evacuation_model import EvacuationState as EvacuationState
from jobs.evacuation_model import Genuine as Genuine
from jobs.evacuation_model import Placement as Placement
from jobs.keys import (
    ACTIVE_EVACUATIONS,
    EVACUATIONS_INDEX,
    JOBS_INDEX,
    children_key,
    domain_lock_key,
    evacuation_redispatched_key,
    evacuation_reported_key,
    evacuation_retries_key,
    job_key,
    jobs_by_host_key,
)
from jobs.model import Job
from jobs.record import MalformedRecord
from jobs.record_read import evacuation_from, record_keys_read, shared_key_read
from jobs.records import transition_keys
from jobs.request_signing import RequestSigner, signed_record
from jobs.states import EVACUATION_TABLE
from jobs.store import JobNotFound, JobStore, now
from jobs.transition import Transitioner

__all__ = ["ACTIVE_EVACUATIONS"]

# How long before its evacuation a child may be scored in the host's job index: the
# evacuation's time is its producer's clock, its children's the worker's.
CLOCK_SLACK_S = 3600.0


# The single-evacuation-per-host check and the creation in one step: two producers (or a
# producer and a scheduled fire) evacuating the same host at once cannot both pass the check.
# KEYS[1] new record, KEYS[2] jobs index, KEYS[3] active set, KEYS[4] the host's index
# (jobs/keys.py jobs_by_host_key), KEYS[5] the evacuations' index; ARGV[1] id, ARGV[2] score,
# ARGV[3] host to check ('' for a dry run, which may run beside anything), ARGV[4] the record
# key prefix, ARGV[5] the oldest score the evacuations' index keeps (the retention),
# ARGV[6..] the record's field/value pairs. Returns {1} or {0, other id, its state}.
_CREATE_LUA = """
if ARGV[3] ~= '' then
  for _, other in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local found = redis.call('HMGET', ARGV[4] .. other, 'spec', 'state')
    if found[1] then
      local spec = cjson.decode(found[1])
      if spec.host == ARGV[3] and not spec.dry_run then return {0, other, found[2] or ''} end
    end
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. ARGV[5])
redis.call('SADD', KEYS[3], ARGV[1])
return {1}
"""


class EvacuationBusy(Exception):
    """The host already has an active (not dry-run) evacuation; the message is one line."""


class EvacuationStore:
    """Evacuation records, in the same id space, index and event streams as migration jobs."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.r = store.r
        self._transitions = Transitioner(self.r, EVACUATION_TABLE, store.retention)
        self._create = self.r.register_script(_CREATE_LUA)

    def create(self, spec: EvacuationSpec, origin: str, signer: RequestSigner | None = None) -> str:
        """Record a queued evacuation; with a `signer`, its request is signed as `origin`'s.

        EvacuationBusy, with nothing written, when the host already has an active evacuation
        and this one is not a dry run (the check and the write are one atomic step).
        """
        ts = now()
        evacuation_id = secrets.token_hex(6)
        signed = signed_record(
            signer,
            kind=EVACUATION_KIND,
            job_id=evacuation_id,
            spec=spec,
            origin=origin,
            at=ts,
        )
        fields = {
            "id": evacuation_id,
            "kind": EVACUATION_KIND,
            "spec": spec.model_dump_json(),
            "state": EvacuationState.QUEUED.value,
            "origin": origin,
            "created": ts.isoformat(),
            "updated": ts.isoformat(),
            **signed,
        }
        created = self._create(
            keys=[
                job_key(evacuation_id),
                JOBS_INDEX,
                ACTIVE_EVACUATIONS,
                jobs_by_host_key(spec.host),
                EVACUATIONS_INDEX,
            ],
            args=[
                evacuation_id,
                ts.timestamp(),
                "" if spec.dry_run else spec.host,
                job_key(""),
                ts.timestamp() - self.store.retention.retention_s,
                *(item for pair in fields.items() for item in pair),
            ],
        )
        if created[0] != 1:
            other, state = created[1], created[2]
            raise EvacuationBusy(f"{spec.host} already has an active evacuation {other} ({state})")
        self.store.replicated()  # on a replica before its id is handed out (jobs/replication.py)
        return evacuation_id

    def get(self, evacuation_id: str) -> Evacuation:
        """The evacuation; JobNotFound for none (or a migration), MalformedRecord for a record
        drover did not write (a field it cannot read, a key of another type)."""
        keys = {job_key(evacuation_id): "hash", children_key(evacuation_id): "hash"}
        with record_keys_read(self.r, f"evacuation {evacuation_id}", keys):
            raw = cast(dict[str, str], self.r.hgetall(job_key(evacuation_id)))
            if not raw:
                raise JobNotFound(f"no job {shown(evacuation_id)}")
            if raw.get("kind") != EVACUATION_KIND:
                raise JobNotFound(f"{shown(evacuation_id)} is a migration job, not an evacuation")
            children = cast(dict[str, str], self.r.hgetall(children_key(evacuation_id)))
        return evacuation_from(raw, children)  # MalformedRecord when it cannot be read

    def transition(
        self, evacuation_id: str, target: EvacuationState, reason: str | None = None
    ) -> tuple[bool, EvacuationState | None]:
        """Move the evacuation to `target` if its state allows it (jobs/transition.py); an
        evacuation keeps no history list, its events tell the story."""
        out = self._transitions.run(
            transition_keys(evacuation_id, ACTIVE_EVACUATIONS),
            evacuation_id,
            target.value,
            now().isoformat(),
            reason=reason,
        )
        if out.moved:
            self.store.replicated()
        return out.moved, EvacuationState(out.previous) if out.previous else None

    def save_plan(self, evacuation_id: str, plan: list[Placement]) -> None:
        data = "[" + ",".join(p.model_dump_json() for p in plan) + "]"
        self.r.hset(job_key(evacuation_id), "plan", data)

    def save_outcome(
        self, evacuation_id: str, outcome: list[DomainOutcome], left_on_host: list[str]
    ) -> None:
        data = "[" + ",".join(o.model_dump_json() for o in outcome) + "]"
        fields = {"outcome": data, "left_on_host": ",".join(left_on_host)}
        self.r.hset(job_key(evacuation_id), mapping=fields)

    def request_abort(self, evacuation_id: str, reason: str, signed: str | None = None) -> None:
        self.r.hset(job_key(evacuation_id), mapping=abort_fields(reason, signed))

    def may_redispatch(self, evacuation_id: str, every_s: float) -> bool:
        """True at most once per `every_s`: a lost task message is sent again, not flooded."""
        key = evacuation_redispatched_key(evacuation_id)
        return bool(self.r.set(key, now().isoformat(), nx=True, px=int(every_s * 1000)))

    def take_retry(self, evacuation_id: str, domain: str, limit: int) -> bool:
        """True if `domain` may be queued again (fewer than `limit` retries so far)."""
        key = evacuation_retries_key(evacuation_id)
        taken = cast(str | None, self.r.hget(key, domain)) or "0"
        if not taken.isascii() or not taken.isdigit() or int(taken) >= limit:
            return False  # a count drover did not write counts as spent: no retry storm
        with self.r.pipeline(transaction=True) as p:
            p.hincrby(key, domain, 1)
            self.store.retention.queue_adopt(p, evacuation_id, key)
            p.execute()
        return True

    def mark_reported(self, evacuation_id: str, item: str) -> bool:
        """True the first time `item` is reported, so that its event is written once: a
        child's end (its job id), a destination that could not be asked (worker's own)."""
        key = evacuation_reported_key(evacuation_id)
        with self.r.pipeline(transaction=True) as p:
            p.sadd(key, item)
            self.store.retention.queue_adopt(p, evacuation_id, key)
            added, _ = p.execute()
        return bool(added)

    def find_children(self, ev: Evacuation, genuine: Genuine = None) -> Children:
        """Each domain's child job: the one the children list names, if its own record says
        it is this evacuation's child of that domain; else, for any domain of the plan, the
        newest job whose record says so, found through the domain's leases
        (a live child holds them) and the host's job index. The list is in Redis, where
        anyone with the password can delete or rewrite it: a child still running must not
        be missed (the evacuation would end under it), nor one ended be taken for one
        never queued. A record that cannot be read is skipped, and its reason returned. Only
        a record that is `genuine` (the worker's check of its signed request, which names
        this evacuation) is one, whatever the plan says: a record and a list entry made by
        hand would end the evacuation under its real child, or hold it open for ever. With
        signing off (`genuine` None), only a domain of the plan has a child."""
        found = Children()
        planned = {p.domain for p in ev.plan or []}
        # Signed, a child needs no plan to vouch for it (the plan is anyone's to rewrite: a
        # domain taken out of it under its live child would end the evacuation under it);
        # with signing off, only a domain of the plan has one.
        signed = genuine is not None
        for domain, job_id in ev.children.items():
            job = self._child(ev, job_id, found, genuine) if signed or domain in planned else None
            if job is not None and job.spec.domain == domain:
                found.jobs[domain] = job
        # Every domain of the plan, a destination or not: the plan is anyone's to rewrite too.
        wanted = {p.domain: p for p in ev.plan or [] if p.domain not in found.jobs}
        known = {job.id for job in found.jobs.values()}
        for job_id in self._candidates(ev, wanted) if wanted or signed else []:
            job = None if job_id in known else self._child(ev, job_id, found, genuine)
            if job is None or job.spec.domain in found.jobs:
                continue
            if not signed and job.spec.domain not in wanted:
                continue
            newest = found.refound.get(job.spec.domain)
            if newest is None or (job.created, job.id) > (newest.created, newest.id):
                found.refound[job.spec.domain] = job
        found.jobs.update(found.refound)
        return found

    def _child(self, ev: Evacuation, job_id: str, found: Children, genuine: Genuine) -> Job | None:
        try:
            job = self.store.get(job_id)
        except MalformedRecord as exc:
            found.unreadable.append(str(exc))
            return None
        except JobNotFound:
            return None
        if job.parent != ev.id or job.spec.src != ev.spec.host:
            return None
        return job if genuine is None or genuine(job) else None

    def _candidates(self, ev: Evacuation, wanted: dict[str, Placement]) -> list[str]:
        """The jobs that hold a lease on a wanted domain, and those of the host's job index
        since the evacuation began, whose record names this evacuation as their parent."""
        leases = [domain_lock_key("name", domain) for domain in wanted]
        leases += [domain_lock_key("uuid", p.uuid) for p in wanted.values()]
        held = cast(list[str | None], self.r.mget(leases)) if leases else []
        ids = {job_id for job_id in held if job_id}
        index = jobs_by_host_key(ev.spec.host)
        with shared_key_read(self.r, index, "zset"):
            since = ev.created.timestamp() - CLOCK_SLACK_S
            ids.update(cast(list[str], self.r.zrangebyscore(index, since, "+inf")))
        ids.discard(ev.id)
        ordered = sorted(ids)
        with self.r.pipeline(transaction=False) as p:
            for job_id in ordered:
                p.hget(job_key(job_id), "parent")
            parents = p.execute(raise_on_error=False)  # a key of another type is no child
        return [job_id for job_id, parent in zip(ordered, parents, strict=True) if parent == ev.id]

    def restore_children(self, evacuation_id: str, children: dict[str, str]) -> None:
        """Put children found by their own records back into the evacuation's list."""
        key = children_key(evacuation_id)
        with self.r.pipeline(transaction=True) as p:
            p.hset(key, mapping=children)
            self.store.retention.queue_adopt(p, evacuation_id, key)
            p.execute()

    def active_ids(self) -> list[str]:
        """The live evacuations; KeyUnreadable when the set is not a set."""
        with shared_key_read(self.r, ACTIVE_EVACUATIONS, "set"):
            return sorted(cast(set[str], self.r.smembers(ACTIVE_EVACUATIONS)))

    def append_event(self, evacuation_id: str, event: dict[str, Any]) -> str:
        return self.store.append_event(evacuation_id, event)
