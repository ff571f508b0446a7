"""The names a request goes by: the field a signed request is kept under in a record
(jobs/request_crypto.py), apart from the cryptography so that reading a record does not load
it; and the CLI option each field of a request comes from, so that a refusal names what the
user typed (jobs/spec.py `first_error`)."""

from __future__ import annotations

from collections.abc import Sequence

REQUEST_FIELD = "request"
MIGRATION_KIND = "migration"  # the kind of a migration job's request (and record)
PREPARED_FIELD = "prepared"  # a job's field holding its destination's signed receipt

# The option of each field of the request models the CLI fills: MigrationSpec (jobs/spec.py),
# DrainOptions (jobs/drain_options.py), EvacuationSpec (jobs/evacuation_model.py) and their
# CompressionOptions (jobs/compression.py, dotted). A field means the same option in each of
# them (tests/unit/test_request_options.py checks every field has its entry). Arguments are
# named as the usage line shows them.
OPTION_FLAGS = {
    # drover migrate
    "domain": "domain",
    "src": "--from",
    "dst": "--to",
    "live": "--live",
    "offline": "--offline",
    "control": "--p2p/--direct/--unmanaged",
    "transport": "--tunnelled",
    "dest_connection": "--dest-connection",
    "tls": "--tls",
    "persistent": "--persistent",
    "undefine_source": "--undefine-source",
    "force": "--force",
    "suspend": "--suspend",
    "dname": "--dname",
    "change_protection": "--change-protection",
    "abort_on_error": "--abort-on-error",
    "auto_converge": "--auto-converge",
    "compressed": "--compressed",
    "compression": "--comp-methods",
    "compression.methods": "--comp-methods",
    "compression.mt_level": "--comp-mt-level",
    "compression.mt_threads": "--comp-mt-threads",
    "compression.mt_dthreads": "--comp-mt-dthreads",
    "compression.xbzrle_cache_mib": "--comp-xbzrle-cache",
    "compression.zlib_level": "--comp-zlib-level",
    "compression.zstd_level": "--comp-zstd-level",
    "postcopy": "--postcopy",
    "bandwidth_mib": "--bandwidth",
    "postcopy_bandwidth_mib": "--postcopy-bandwidth",
    "policy": "--policy",
    "completion_timeout_s": "--completion-timeout",
    "timeout_action": "--timeout-action",
    "parallel": "--parallel",
    "copy_storage": "--copy-storage",
    "migrate_uri": "--migrate-uri",
    "listen_address": "--listen-address",
    "unsafe": "--unsafe",
    "migrate_disks": "--migrate-disks",
    "dry_run": "--dry-run",
    "dest_xml": "--xml",
    "persist_xml": "--persistent-xml",
    "tls_destination": "--tls-destination",
    "disks_port": "--disks-port",
    "disks_uri": "--disks-uri",
    # drover evacuate (and the drain options it shares with scheduled drains)
    "tunnelled": "--tunnelled",
    "host": "host",
    "to": "--to",
    "max_parallel": "--max-parallel",
    "include_inactive": "--include-inactive",
}


def option_of(loc: Sequence[int | str]) -> str:
    """The option an error's location names (`('compression', 'methods', 0)` is
    `--comp-methods`), or the dotted location when no option has that field."""
    names = [str(part) for part in loc if not isinstance(part, int)]
    for end in range(len(names), 0, -1):
        option = OPTION_FLAGS.get(".".join(names[:end]))
        if option is not None:
            return option
    return ".".join(str(part) for part in loc)
