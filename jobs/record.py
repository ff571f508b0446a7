"""What the phases write into a migration job's record: the source's facts, the destination's
hand-off and the result, as typed models.

Each is kept as one JSON field of the job hash (`facts`, `handoff`, `result`), merged into as
the phases go (jobs/records.py `update`); an empty or absent field reads as "not written yet".
A field that is not what drover writes is refused as a `MalformedRecord` naming the job and
the field, rather than read as whatever it holds.

These are records for people and for the worker's own later phases, not instructions: anyone
with the Redis password can edit them. Whatever reaches libvirt (the URI it opens, the path
it writes, the domain it acts on) is recomputed or re-read by the worker from the registry,
the signed spec and libvirt itself; the record only says what was found or done.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from config.policy_model import EffectivePolicy

M = TypeVar("M", bound=BaseModel)


class JobNotFound(LookupError):
    """No job (or evacuation) of that id, or not of the kind asked for."""


class MalformedRecord(JobNotFound, ValueError):
    """A job record field that drover did not write (or no longer can read); one line.

    A JobNotFound too: whoever skips a job that is gone (the recovery sweep, the keeper's
    duties, a phase's task) skips one it cannot read, with this message, instead of failing
    on it every pass and never reaching the jobs after it.
    """


class DomainFacts(BaseModel):
    """A domain as libvirt showed it on one host."""

    model_config = ConfigDict(frozen=True)

    name: str
    uuid: str
    state: str
    active: bool
    persistent: bool
    memory_mib: int
    vcpus: int


class DiskFacts(BaseModel):
    """One writable file-backed disk of the guest (a storage copy moves it)."""

    model_config = ConfigDict(frozen=True)

    path: str
    format: str
    capacity: int  # bytes


class SourceFacts(DomainFacts):
    """What the source's preflight found (and the destination's prepare added)."""

    disks: list[DiskFacts] = []  # only with --copy-storage
    # Written by the destination's prepare: it already held an inactive definition.
    dest_config_present: bool = False


class Handoff(BaseModel):
    """Where the domain goes: the destination libvirt URI, the hypervisor migration URI and
    the listen address; and the disk images the destination created for it.

    The worker always computes the URIs from the registry and the signed spec
    (worker/migration_call.py `handoff_for`), on whichever side needs them; the copy in the job
    record is for people to read and is never read back: a record anyone with the Redis
    password can edit must not choose the URI libvirtd opens (`qemu+ext://...?command=` runs a
    program) or where a guest's memory goes. Likewise a rollback removes only the images the
    destination's own ledger recorded (worker/ledger.py), never `created_images`.
    """

    model_config = ConfigDict(frozen=True)

    dconnuri: str | None = None  # None: not handed off yet
    migrate_uri: str | None = None
    listen_address: str | None = None
    created_images: list[str] = []

    def as_dict(self) -> dict[str, Any]:
        """The three URIs (the fields of a `prepare.ready` event)."""
        return {
            "dconnuri": self.dconnuri,
            "migrate_uri": self.migrate_uri,
            "listen_address": self.listen_address,
        }


class MigrationFigures(BaseModel):
    """libvirt's completed job statistics of a migration (virDomainGetJobStats with
    VIR_DOMAIN_JOB_STATS_COMPLETED, or the job-completed event): what it took, in total."""

    model_config = ConfigDict(frozen=True)

    time_elapsed_ms: int | None = None
    setup_time_ms: int | None = None
    data_total: int | None = None  # bytes
    data_processed: int | None = None
    data_remaining: int | None = None
    memory_total: int | None = None
    memory_processed: int | None = None
    memory_bps: int | None = None  # bytes per second at the end
    memory_dirty_rate: int | None = None  # pages per second at the end
    memory_iteration: int | None = None
    memory_postcopy_requests: int | None = None  # pages the destination faulted in
    disk_total: int | None = None
    disk_processed: int | None = None
    auto_converge_throttle: int | None = None  # percent


MigrationMode = Literal["precopy", "postcopy"]
# Where the final figures came from: the source's job-completed event, or the destination's
# completed statistics (pre-copy only: after post-copy the destination has no downtime).
FiguresSource = Literal["job-completed event", "destination"]


class CheckVerdict(BaseModel):
    """One pre-check's verdict on one host (worker/precheck.py): passed, or why not."""

    model_config = ConfigDict(frozen=True)

    check: str
    host: str
    passed: bool
    reason: str | None = None


class Result(BaseModel):
    """What the job's phases measured and verified, each field written by the phase named."""

    migration_ms: float | None = None  # perform: the libvirt migration call, timed
    last_progress: dict[str, Any] = {}  # perform: libvirt's last job statistics
    # perform: how long the guest was paused for the switch-over, as libvirt measured it
    # (after a post-copy, from the pause libvirt announced before the switch, if any)
    downtime_ms: int | None = None
    # perform: of that, the time the guest was paused before the switch to post-copy
    paused_before_switch_ms: int | None = None
    mode: MigrationMode | None = None  # perform: the mode the migration finished in
    final: MigrationFigures | None = None  # perform: libvirt's completed statistics
    figures_from: FiguresSource | None = None
    destination: DomainFacts | None = None  # finish: the guest as it arrived
    source_defined: bool | None = None  # confirm: whether the source still defines it
    leftovers: str | None = None  # confirm: what was left behind on the source, and why
    source_checks: list[CheckVerdict] = []  # source_preflight: its pre-checks' verdicts
    destination_checks: list[CheckVerdict] = []  # destination_prepare: its pre-checks'


RECORD_FIELDS: dict[str, type[BaseModel]] = {
    "facts": SourceFacts,
    "policy": EffectivePolicy,
    "handoff": Handoff,
    "result": Result,
}


def parse_field(model: type[M], job_id: str, name: str, raw: str | None) -> M | None:
    """Field `name` of job `job_id` as `model`; None when not written yet (absent or `{}`)."""
    if not raw:
        return None
    try:
        data = json.loads(raw)
        if data == {}:
            return None
        return model.model_validate(data)
    except (ValueError, ValidationError) as exc:
        raise MalformedRecord(
            f"job {job_id}: its {name} is not a valid record: {first_complaint(exc)}"
        ) from None


def merged_field(job_id: str, name: str, old: str | None, new: BaseModel | dict[str, Any]) -> str:
    """The JSON of field `name` once `new` is merged into `old`, checked against its model.

    Only what was written is kept (a model's defaults are not spelled out), so the stored
    shape is what it always was: the source's facts, then `dest_config_present` beside them.
    """
    model = RECORD_FIELDS[name]
    update = new.model_dump(mode="json", exclude_unset=True) if isinstance(new, BaseModel) else new
    try:
        merged = {**json.loads(old or "{}"), **update}
    except ValueError as exc:
        raise MalformedRecord(f"job {job_id}: its {name} is not a valid record: {exc}") from None
    try:
        checked = model.model_validate(merged)
    except ValidationError as exc:
        raise MalformedRecord(
            f"job {job_id}: refusing to write {name}: {first_complaint(exc)}"
        ) from None
    return checked.model_dump_json(exclude_unset=True)


def first_complaint(exc: Exception) -> str:
    """One line for an error: pydantic's first complaint, with where it is."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "the record"
        return f"{where}: {err['msg']}"
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]} field"
    return (str(exc).splitlines() or [type(exc).__name__])[0]
