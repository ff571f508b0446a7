"""What each Redis role is granted, read off drover's key layout and kombu's transport.

Why each grant exists is the module doc of config/redis_acl.py and docs/redis-acl.md.
"""

from __future__ import annotations

from config.key_prefixes import KEY_PREFIX as JOBS_KEY_PREFIX
from config.key_prefixes import SCHEDULE_KEY_PREFIX
from config.redis_acl_model import (
    BEAT,
    BINDING_DEADLINES,
    BINDING_EXPIRY_COMMANDS,
    BINDING_PREFIX,
    FLOWER,
    PERMANENT_BINDING_PREFIX,
    PRODUCER,
    ROLES,
    SCRIPT_COMMANDS,
    UNACKED_KEYS,
    WORKER,
    BrokerNames,
    ChannelPattern,
    Grant,
    KeyPattern,
    Role,
)


def grants(names: BrokerNames) -> dict[str, Grant]:
    """Every grant, by name; `roles` picks from these."""
    n = names
    queues = f"{n.host_queue_prefix}*"
    data = ("+@read", "+@write", "+@transaction")
    return {
        "jobs": Grant(
            "jobs",
            "job and evacuation records, their transitions, phases and event streams, domain "
            "leases, concurrency slots, memory reservations, maintenance marks, worker "
            "heartbeats and host reports, schedule entries",
            keys=(KeyPattern(f"{JOBS_KEY_PREFIX}:*", "RW", "everything drover keeps"),),
            categories=data,
        ),
        "schedules": Grant(
            "schedules",
            "celery-redbeat's entries, their index and statics, and the beat's lock",
            keys=(
                KeyPattern(
                    f"{SCHEDULE_KEY_PREFIX}*",
                    "RW",
                    "redbeat_key_prefix (schedules/beat.py); the lock is under it too",
                ),
            ),
            categories=data,
        ),
        "scripts": Grant(
            "scripts",
            "compare-and-set transitions, admission, leases, reservations and redis-py's "
            "locks are Lua scripts: EVALSHA, SCRIPT LOAD when Redis lost them, EVAL",
            commands=SCRIPT_COMMANDS,
        ),
        "publish-tasks": Grant(
            "publish-tasks",
            "send phase tasks to host queues: declare the queue, route, LPUSH",
            keys=(
                KeyPattern(queues, "W", "LPUSH onto a host's queue, never read it"),
                KeyPattern(
                    f"{BINDING_PREFIX}{queues}",
                    "RW",
                    "the queue's binding: SADD when declared, SMEMBERS to route",
                ),
                KeyPattern(
                    f"{PERMANENT_BINDING_PREFIX}{queues}",
                    "RW",
                    "the same binding marked permanent (no x-expires): SADD when declared",
                ),
            ),
            data_commands=("+lpush", "+sadd", "+smembers"),
        ),
        "consume-tasks": Grant(
            "consume-tasks",
            "take phase tasks off the host's queue and acknowledge them",
            keys=(
                KeyPattern(queues, "RW", "BRPOP from the host's queue"),
                *(
                    KeyPattern(key, "RW", "kombu's ack emulation and its restore lock")
                    for key in UNACKED_KEYS
                ),
            ),
            data_commands=("+brpop", "+zadd", "+hset", "+hdel", "+zrem", "+zrevrangebyscore"),
        ),
        "send-events": Grant(
            "send-events",
            "Celery events (task-sent, task-started, worker-heartbeat, ...) for Flower",
            channels=(
                ChannelPattern(
                    f"{n.fanout}{n.event_exchange}/*",
                    "PUBLISH /<db>.celeryev/<event type>",
                ),
            ),
            commands=("+publish",),
        ),
        "receive-events": Grant(
            "receive-events",
            "an event receiver: bind a queue to celeryev, PSUBSCRIBE, clean up on exit",
            keys=(
                KeyPattern(
                    f"{BINDING_PREFIX}{n.event_exchange}",
                    "RW",
                    "the receiver's binding: SADD (by kombu's refresh script), SREM when it "
                    "leaves, DEL by a sweep once overdue",
                ),
                *_binding_expiry_keys(n.event_exchange),
                KeyPattern(
                    f"{n.event_queue_prefix}.*",
                    "W",
                    "DEL of the receiver's (never filled) auto-delete queue when it leaves",
                ),
            ),
            channels=(
                ChannelPattern(
                    f"{n.fanout}{n.event_exchange}/*",
                    "PSUBSCRIBE of exactly this pattern (routing key #)",
                ),
            ),
            commands=("+psubscribe", "+punsubscribe", "+unsubscribe", *SCRIPT_COMMANDS),
            data_commands=(
                "+sadd",
                "+srem",
                "+del",
                "+multi",
                "+exec",
                "+discard",
                *BINDING_EXPIRY_COMMANDS,
            ),
        ),
        "queue-lengths": Grant(
            "queue-lengths",
            "Flower's Broker page and /api/queues/length: LLEN of every queue it knows",
            keys=(
                KeyPattern(queues, "R", "LLEN of each host queue and its priority lists"),
                KeyPattern(f"{n.default_queue}*", "R", "LLEN of Celery's default queue"),
            ),
            data_commands=("+llen", "+multi", "+exec", "+discard"),
        ),
        "send-control": Grant(
            "send-control",
            "Celery remote control requests (inspect, ping): PUBLISH to the pidbox, then "
            "wait for the replies on a reply queue of its own",
            keys=(
                KeyPattern(
                    f"{BINDING_PREFIX}{n.reply_pidbox}",
                    "RW",
                    "the reply queue's binding: SADD, SREM when it goes",
                ),
                *_binding_expiry_keys(n.reply_pidbox),
                KeyPattern(
                    f"*.{n.reply_pidbox}*",
                    "RW",
                    "its own reply queue <ticket>.reply.celery.pidbox (and its priority "
                    "lists): purged first, BRPOP of the replies, DEL when it goes",
                ),
                *(
                    KeyPattern(
                        key,
                        "RW",
                        "kombu has every consumer, a reply consumer too, put back messages "
                        "a dead consumer left unacknowledged (under the unacked_mutex lock)",
                    )
                    for key in UNACKED_KEYS
                ),
            ),
            channels=(ChannelPattern(f"{n.fanout}{n.pidbox}", "PUBLISH of a broadcast request"),),
            commands=("+publish", *SCRIPT_COMMANDS),
            data_commands=(
                # the reply queue: bound, purged, read, removed
                "+sadd",
                "+srem",
                "+llen",
                "+brpop",
                "+del",
                # the restore: the lock (SET NX, a Lua GET and DEL to release), the stale
                # tags, the transaction putting them back
                "+set",
                "+get",
                "+zrevrangebyscore",
                "+hget",
                "+zrem",
                "+hdel",
                "+watch",
                "+unwatch",
                "+multi",
                "+exec",
                "+discard",
                *BINDING_EXPIRY_COMMANDS,
            ),
        ),
        "serve-control": Grant(
            "serve-control",
            "a worker's pidbox: PSUBSCRIBE to the broadcast channel, reply to each request",
            keys=(
                KeyPattern(
                    f"{BINDING_PREFIX}{n.pidbox}",
                    "RW",
                    "the worker's pidbox binding: SADD, SREM when it stops",
                ),
                *_binding_expiry_keys(n.pidbox),
                KeyPattern(
                    f"{BINDING_PREFIX}{n.reply_pidbox}",
                    "R",
                    "SMEMBERS to route a reply to the requester's queue",
                ),
                KeyPattern(
                    f"*.{n.pidbox}*",
                    "W",
                    "LPUSH of a reply to <ticket>.reply.celery.pidbox; DEL of its own "
                    "<node>.celery.pidbox queue when it stops",
                ),
            ),
            channels=(ChannelPattern(f"{n.fanout}{n.pidbox}", "PSUBSCRIBE of exactly this"),),
            commands=("+psubscribe", "+punsubscribe", "+unsubscribe", "+time"),
            data_commands=("+lpush", "+smembers"),
        ),
    }


def _binding_expiry_keys(exchange: str) -> tuple[KeyPattern, ...]:
    """The keys by which an expiring queue bound to `exchange` keeps its binding (kombu 5.7)."""
    return (
        KeyPattern(
            f"{PERMANENT_BINDING_PREFIX}{exchange}",
            "RW",
            "SREM when the queue goes; EXISTS by a sweep (a permanent binding is kept)",
        ),
        KeyPattern(
            BINDING_DEADLINES,
            "RW",
            "the binding's deadline: ZADD by kombu's refresh script, ZRANGEBYSCORE and ZREM "
            "by its sweep",
        ),
    )


_ROLE_WHY = {
    WORKER: "`drover worker --host H` on each hypervisor: runs phases, admits waiting jobs, "
    "plans evacuations, fires scheduled ones; sends tasks to other hosts",
    PRODUCER: "the CLI and the Python API (and `drover lab`): submit, admit, abort, follow, "
    "schedule",
    FLOWER: "`drover flower`: watches Celery events and queue lengths; reads no job",
    BEAT: "`drover beat`: celery-redbeat's scheduler; sends scheduled evacuation tasks",
}
_ROLE_GRANTS = {
    WORKER: ("jobs", "scripts", "publish-tasks", "consume-tasks", "send-events"),
    PRODUCER: ("jobs", "scripts", "publish-tasks", "send-events"),
    FLOWER: ("receive-events", "queue-lengths"),
    BEAT: ("schedules", "scripts", "publish-tasks", "send-events"),
}
# While workers serve remote control: they answer it; producers (`drover lab`'s start-up
# ping, `celery inspect`) and Flower's worker pages ask.
_CONTROL_GRANTS = {WORKER: "serve-control", PRODUCER: "send-control", FLOWER: "send-control"}


def roles(names: BrokerNames) -> dict[str, Role]:
    """Every role with its grants, for these broker names."""
    available = grants(names)
    out = {}
    for role in ROLES:
        chosen = list(_ROLE_GRANTS[role])
        if names.remote_control and role in _CONTROL_GRANTS:
            chosen.append(_CONTROL_GRANTS[role])
        out[role] = Role(role, _ROLE_WHY[role], tuple(available[g] for g in chosen))
    return out
