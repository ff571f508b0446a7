"""Scheduled evacuations: entries of celery-redbeat's scheduler, kept in Redis.

Why redbeat: the schedule lives in Redis beside the jobs (no schedule file on one machine to
lose), entries can be added and removed while `drover beat` runs, and a lock in Redis lets
several beats stand by while exactly one fires.

Each entry sends `drover.scheduled_evacuation` with its schedule id as the only argument
(workers accept nothing else, config/security.py) to the queue of the host it evacuates; that
host's worker reads the stored request back and validates it again before evacuating. The
request is kept in the entry's own Redis hash, beside redbeat's `definition` and `meta` fields,
so removing the entry removes it too.

Times are UTC throughout: cron expressions are evaluated in UTC (Celery's default timezone),
and an `--at` time without an offset is taken as UTC.

Modules: records.py (the records and their Redis keys), cron.py (when: strict parsing, the
next run, which signed time a firing answers), signing.py (a schedule's request signed and
checked like any request), entries.py (entries read back, each on its own: one that cannot be
read is left out and said), store.py (add, list, remove, record a run), beat.py (redbeat and
`drover beat`), beat_scheduler.py (redbeat's scheduler, skipping an entry it cannot read),
firing.py (what a worker does when one fires), removal.py (telling the host's worker that a
schedule was removed). Below worker and producer, above jobs: both use it.
"""
