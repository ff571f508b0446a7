"""The names a signed request is kept under in a record (jobs/request_crypto.py), apart from
the cryptography so that reading a record does not load it."""

from __future__ import annotations

REQUEST_FIELD = "request"
MIGRATION_KIND = "migration"  # the kind of a migration job's request (and record)
