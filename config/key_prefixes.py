"""The prefixes of drover's Redis keys, at the bottom layer.

The ACL of each Redis role (config/redis_acl.py) is written against these prefixes, and the
key names themselves are built on them above (jobs/, schedules/): so config needs nothing
from the layers that use the keys.
"""

from __future__ import annotations

# Every key drover keeps starts with this (jobs, evacuations, slots, schedules, ...).
KEY_PREFIX = "drover"
# redbeat names a schedule entry's hash `<prefix><schedule id>` and keeps its index and its
# lock under the same prefix.
SCHEDULE_KEY_PREFIX = f"{KEY_PREFIX}:schedule:"
