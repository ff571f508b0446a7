"""celery-redbeat's settings for drover, and `drover beat`: the one active scheduler."""

from __future__ import annotations

from typing import Any

from celery import Celery

from config.addresses import shown
from config.celery import celery_config, make_app
from config.redis_sentinel import is_sentinel, redbeat_settings
from config.settings import Settings
from jobs.connection import client_for
from jobs.keys import SCHEDULE_LOCK, SCHEDULE_PREFIX
from jobs.lease import FREE_UNLESS_HELD_LUA
from schedules.records import FIRE_LATE_LIMIT_S, ScheduleError

# redbeat's scheduler, reading each entry on its own (schedules/beat_scheduler.py).
REDBEAT_SCHEDULER = "schedules.beat_scheduler:DroverScheduler"
# A beat looks for due entries at least this often, so an entry added while it runs fires on
# time (redbeat's default of 300 s would sleep straight past a schedule added a minute ahead).
BEAT_MAX_INTERVAL_S = 1.0
# A standby beat takes over at most this long after the active one died without releasing
# the lock (a beat stopped normally releases it at once). Longer than a tick can take.
BEAT_LOCK_TIMEOUT_S = 60
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def redbeat_config(settings: Settings, *, retry_period: float | None = None) -> dict[str, Any]:
    """Celery settings for redbeat, all explicit (redbeat 2.5 drops its broker fallbacks).

    `retry_period` lets a worker's reads ride out a Redis restart; producers and the beat
    fail at once instead.
    `result_expires = None` keeps Celery from adding its daily `backend_cleanup` entry, which
    no drover worker consumes (drover stores no results).
    """
    options: dict[str, Any] = {} if retry_period is None else {"retry_period": retry_period}
    url = settings.redis_url
    if is_sentinel(url):  # redbeat reads a Sentinel set from its options
        url, sentinel_options = redbeat_settings(url)
        options |= sentinel_options
    return {
        "redbeat_redis_url": url,
        "redbeat_redis_options": options,
        "redbeat_key_prefix": SCHEDULE_PREFIX,
        "redbeat_lock_key": SCHEDULE_LOCK,
        "redbeat_lock_timeout": BEAT_LOCK_TIMEOUT_S,
        "beat_scheduler": REDBEAT_SCHEDULER,
        "beat_max_loop_interval": BEAT_MAX_INTERVAL_S,
        "beat_cron_starting_deadline": FIRE_LATE_LIMIT_S,
        "result_expires": None,
    }


def redbeat_app(settings: Settings, *, retry_period: float | None = None) -> Celery:
    """A Celery app with the fleet's settings plus redbeat's, for reading and writing entries."""
    app = Celery("drover", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.update(redbeat_config(settings, retry_period=retry_period))
    return app


def run_beat(settings: Settings, *, loglevel: str) -> None:
    """Run Celery beat with redbeat on the fleet's Redis until SIGTERM or SIGINT.

    Only the beat holding the lock (`SCHEDULE_LOCK`) fires; another one started beside it waits
    for the lock and takes over when the first stops (or `BEAT_LOCK_TIMEOUT_S` after it died).
    Messages are signed like every producer's when `[security] signing` is on.
    """
    if loglevel.upper() not in LOG_LEVELS:
        raise ScheduleError(f"--loglevel {shown(loglevel)}: one of {', '.join(LOG_LEVELS)}")
    # Fail in one line when Redis is out of reach; redbeat would only log a traceback.
    with client_for(settings.redis_url) as client:
        client.ping()
        # A lock with no time to live was set by hand (every beat's lock has one): redbeat
        # would wait for it for ever. Cleared here, so a beat started again takes over.
        client.eval(FREE_UNLESS_HELD_LUA, 1, SCHEDULE_LOCK)
    beat_app = make_app(settings)  # registers the signing key when signing is on
    # No retrying: redbeat renews its lock on every tick without it anyway, so a beat that
    # loses Redis exits at its next tick, and its supervisor starts it again.
    beat_app.conf.update(redbeat_config(settings))
    beat_app.Beat(
        scheduler=REDBEAT_SCHEDULER,
        max_interval=BEAT_MAX_INTERVAL_S,
        loglevel=loglevel.upper(),
    ).run()
