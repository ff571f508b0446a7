"""Every Redis key drover keeps, in one place: what each one holds and who writes it.

All of them start with `KEY_PREFIX` (the Redis ACL of config/redis_acl.py grants `drover:*`).
A job and an evacuation share one id space, one index and one layout under `job:<id>`. The
names here are the data format: changing one strands what a running fleet has written.
"""

from __future__ import annotations

from config.key_prefixes import KEY_PREFIX, SCHEDULE_KEY_PREFIX

__all__ = ["KEY_PREFIX"]

# --- indexes and lines --------------------------------------------------------------------
JOBS_INDEX = f"{KEY_PREFIX}:jobs"  # sorted set: every job and evacuation id, by creation time
ACTIVE_JOBS = f"{KEY_PREFIX}:active"  # set: migration jobs not yet terminal
WAITING = f"{KEY_PREFIX}:waiting"  # sorted set: jobs not yet admitted, oldest first
ACTIVE_EVACUATIONS = f"{KEY_PREFIX}:evacuations:active"  # set: evacuations not yet terminal
DISABLED_HOSTS = f"{KEY_PREFIX}:hosts:disabled"  # hash: host -> why it is in maintenance
ENABLED_HOSTS = f"{KEY_PREFIX}:hosts:enabled"  # hash: host -> the signed `host enable`, last

# --- one job (or evacuation) ----------------------------------------------------------------
JOB_PREFIX = f"{KEY_PREFIX}:job:"
# The field of a stream entry that holds the event's JSON.
EVENT_FIELD = "data"
# Fields of the job hash written outside the record model (jobs/model.py).
POSTCOPY_FIELD = "postcopy_since"  # when libvirt switched the migration to post-copy
ABORT_FIELD = "abort_requested"  # the operator's abort request: its reason
ABORT_SIGNED_FIELD = "abort_request"  # that request as its asker signed it (signing on)
GATES_FIELD = "gates"  # the admission gates the job holds a slot in, space-separated
LEASE_FIELD_PREFIX = "lease:"  # lease:<key> = "1" for each domain lease the job took


def job_key(job_id: str) -> str:
    """The record: a hash of its fields (jobs/model.py)."""
    return f"{JOB_PREFIX}{job_id}"


def events_key(job_id: str) -> str:
    """Its event stream."""
    return f"{job_key(job_id)}:events"


def transitions_key(job_id: str) -> str:
    """A migration job's state history: a list of Transition JSON."""
    return f"{job_key(job_id)}:transitions"


def phases_key(job_id: str) -> str:
    """A migration job's phase records: phase -> PhaseRecord JSON."""
    return f"{job_key(job_id)}:phases"


def tune_key(job_id: str) -> str:
    """The operator's `drover tune` requests not yet taken by the source worker: a list of
    TuneRequest JSON (jobs/control.py), pushed by the producer, popped by the worker."""
    return f"{job_key(job_id)}:tune"


def claims_key(job_id: str) -> str:
    """Which host claimed each phase (a phase runs once per job)."""
    return f"{job_key(job_id)}:claims"


def runner_key(job_id: str, phase: str) -> str:
    """Which worker process runs a job's phase now (the phase record says only which host)."""
    return f"{job_key(job_id)}:runner:{phase}"


def redispatched_field(phase: str) -> str:
    """The job hash's field saying when recovery last sent `phase` again."""
    return f"redispatched:{phase}"


def lease_field(key: str) -> str:
    return f"{LEASE_FIELD_PREFIX}{key}"


def children_key(evacuation_id: str) -> str:
    """An evacuation's child jobs: domain -> job id."""
    return f"{job_key(evacuation_id)}:children"


def evacuation_redispatched_key(evacuation_id: str) -> str:
    """Set (with a time to live) when an evacuation's task was last sent again."""
    return f"{job_key(evacuation_id)}:redispatched"


def evacuation_retries_key(evacuation_id: str) -> str:
    """How often each domain of an evacuation was queued again: domain -> count."""
    return f"{job_key(evacuation_id)}:retries"


def evacuation_reported_key(evacuation_id: str) -> str:
    """The children whose end the evacuation has reported (its event is written once)."""
    return f"{job_key(evacuation_id)}:reported"


# --- leases ------------------------------------------------------------------------------------


def domain_lock_key(kind: str, value: str) -> str:
    """One active job per domain: by name at submit, by UUID once the source has looked."""
    return f"{KEY_PREFIX}:lock:{kind}:{value}"


# --- hosts and their workers -----------------------------------------------------------------
RESERVATIONS_PREFIX = f"{KEY_PREFIX}:host:"
RESERVATIONS_SUFFIX = ":reservations"


def reservations_key(host: str) -> str:
    """Memory booked on `host` for live jobs: job id -> MiB."""
    return f"{RESERVATIONS_PREFIX}{host}{RESERVATIONS_SUFFIX}"


def heartbeat_key(host: str) -> str:
    """Present (with a time to live) while `host` has a worker taking work."""
    return f"{KEY_PREFIX}:worker:{host}:alive"


def host_report_key(host: str) -> str:
    """A worker's view of its host (free memory, running domains) for `drover hosts`."""
    return f"{KEY_PREFIX}:worker:{host}:report"


def draining_key(host: str) -> str:
    """Set by a worker in warm shutdown: since when, and what it still runs."""
    return f"{KEY_PREFIX}:worker:{host}:draining"


# --- admission gates (jobs/admission.py) -------------------------------------------------------
CLUSTER_GATE = f"{KEY_PREFIX}:slots:cluster"


def outbound_gate(host: str) -> str:
    return f"{KEY_PREFIX}:slots:out:{host}"


def inbound_gate(host: str) -> str:
    return f"{KEY_PREFIX}:slots:in:{host}"


def evacuation_gate(evacuation_id: str) -> str:
    return f"{KEY_PREFIX}:slots:evacuation:{evacuation_id}"


# --- schedules (redbeat's entries and drover's schedule records) ------------------------------
# redbeat names an entry's hash `<prefix><name>` (the name is the schedule id) and keeps its
# index in `<prefix>:schedule`; the lock must start with the prefix too.
SCHEDULE_PREFIX = SCHEDULE_KEY_PREFIX
SCHEDULE_LOCK = f"{SCHEDULE_PREFIX}lock"  # string: the active beat's lock (redbeat)


def schedule_entry_key(schedule_id: str) -> str:
    """A schedule's redbeat entry, which also holds drover's signed record."""
    return f"{SCHEDULE_PREFIX}{schedule_id}"


def schedule_fired_key(schedule_id: str, message_id: str) -> str:
    """Set once by the worker that fires a schedule's message (a redelivery fires nothing)."""
    return f"{schedule_entry_key(schedule_id)}:fired:{message_id}"


# --- retention and the listing indexes (jobs/retention.py, jobs/listing.py) -------------------
# A finished job's (or evacuation's) own keys expire `tunables.job_retention_days` after its
# end; these shared sorted sets, scored by creation time like JOBS_INDEX, are trimmed to that
# window whenever a record ends (sorted-set members cannot expire on their own).
JOBS_BY_STATE_PREFIX = f"{KEY_PREFIX}:jobs:state:"
JOBS_BY_HOST_PREFIX = f"{KEY_PREFIX}:jobs:host:"
WAITING_BY_ORIGIN_PREFIX = f"{KEY_PREFIX}:waiting:origin:"


def jobs_by_state_key(state: str) -> str:
    """Sorted set: ids of the records that ended in `state` (terminal states only)."""
    return f"{JOBS_BY_STATE_PREFIX}{state}"


def jobs_by_host_key(host: str) -> str:
    """Sorted set: ids of the migrations from or to `host`, and of the evacuations of it."""
    return f"{JOBS_BY_HOST_PREFIX}{host}"


def waiting_by_origin_key(origin: str) -> str:
    """Set: the jobs a producer submitted that may still wait (`[cluster]
    max_waiting_per_producer`); admitted and ended ones are pruned when it is counted."""
    return f"{WAITING_BY_ORIGIN_PREFIX}{origin}"


def record_keys(job_id: str) -> list[str]:
    """Every key of one record that has no time to live of its own: they all expire together
    once it has ended (runner marks and the evacuation's redispatch mark carry their own)."""
    return [
        job_key(job_id),
        events_key(job_id),
        transitions_key(job_id),
        phases_key(job_id),
        tune_key(job_id),
        claims_key(job_id),
        children_key(job_id),
        evacuation_retries_key(job_id),
        evacuation_reported_key(job_id),
    ]


# --- host facts (jobs/host_facts.py) ------------------------------------------------------------
# A worker's published inventory of its host, for the evacuation planner; with a time to live.
def host_facts_key(host: str) -> str:
    """A `HostFacts` record (JSON): memory, hypervisor CPU, running domains and groups."""
    return f"{KEY_PREFIX}:worker:{host}:facts"


# --- the waiting line, by lane (jobs/lanes.py) -------------------------------------------------
# A lane is every waiting job between one source and one destination (and of one evacuation,
# whose --max-parallel is a gate of its own): a sorted set, oldest first. A non-empty lane is
# either ready (its head not tried since it changed) or blocked on the one gate that refused
# its head, so an admission pass looks only at lanes that can move.
LANES = f"{KEY_PREFIX}:lanes"  # set: every lane key that may hold waiting jobs
LANES_READY = f"{KEY_PREFIX}:lanes:ready"  # sorted set: lane -> its head's creation time
LANES_BLOCKED_BY = f"{KEY_PREFIX}:lanes:blocked_by"  # hash: lane -> the gate refusing its head
# hash: gate -> its limit when it last refused a lane, for every gate some lane is blocked on
BLOCKING_GATES = f"{KEY_PREFIX}:lanes:blocking"
BLOCKED_PREFIX = f"{KEY_PREFIX}:lanes:blocked:"
LANE_PREFIX = f"{KEY_PREFIX}:lane:"
LANE_FIELD = "lane"  # the job hash's field naming the lane it waits in
SAFETY_PASS = f"{KEY_PREFIX}:lanes:safety"  # string with a time to live: who did the last one


def lane_key(src: str, dst: str, parent: str | None = None) -> str:
    """A lane: host names cannot hold ':' (jobs/spec.py), so the key names one lane only."""
    tail = f":{parent}" if parent else ""
    return f"{LANE_PREFIX}{src}:{dst}{tail}"


def blocked_key(gate: str) -> str:
    """Sorted set: the lanes whose head `gate` refused -> the head's creation time."""
    return f"{BLOCKED_PREFIX}{gate}"


# --- the fleet exporter (producer/exporter.py, jobs/fleet.py) ----------------------------------
# string with a time to live: the token of the one active `drover exporter` (jobs/lease.py)
EXPORTER_LEASE = f"{KEY_PREFIX}:exporter:lease"
# sorted set: every evacuation id, by creation time (written by jobs/evacuation.py's create,
# trimmed to the retention there). Evacuations share the state indexes with migration jobs
# (`failed`, `cancelled`): this tells the two apart without reading a record.
EVACUATIONS_INDEX = f"{KEY_PREFIX}:evacuations:all"
# redbeat's index of its entries (`<key_prefix>:schedule`, scored by when each is due next).
SCHEDULE_INDEX = f"{SCHEDULE_PREFIX}:schedule"
SLOTS_PREFIX = f"{KEY_PREFIX}:slots:"  # every admission gate's key starts so (see above)
