"""The Python API (producer/api.py) refuses what it cannot honour, in one line, and says an
outage only when Redis is out of reach.

Against the real test Redis: a spec and keywords together, a caller's spec that no longer
validates, arguments of the wrong type or out of the CLI's bounds are each a BadArgument or
SubmitError with one line and nothing written; with Redis unreachable every public method is
a BrokerUnavailable; a program's error is never one.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kombu.exceptions
import pytest
import redis

from config.settings import load_settings
from jobs.errors import BadArgument, BrokerUnavailable, SubmitError, broker_errors
from jobs.evacuation import EvacuationSpec, EvacuationStore
from jobs.liveness import Liveness
from jobs.maintenance import Maintenance
from jobs.spec import MigrationSpec
from jobs.store import JobStore
from producer.api import Drover
from producer.jobs_list import MAX_LIMIT
from tests.conftest import free_port
from tests.support.registry import REGISTRY

SPEC = MigrationSpec(domain="web01", src="kvm1", dst="kvm2")
EVACUATION = EvacuationSpec(host="kvm1", dry_run=True)
# A call refused up front returns within this (the old code blocked on some forever).
AT_ONCE_S = 5.0
HEARTBEAT_S = 60.0


@pytest.fixture
def d(config: Path) -> Drover:
    return Drover(load_settings(config))


@pytest.fixture
def down(tmp_path: Path) -> Drover:
    """The API on a port nothing listens on, trying once and riding out no outage."""
    path = tmp_path / "down.toml"
    url = f"redis://:sekret@127.0.0.1:{free_port()}/0"
    tunables = "\n[tunables]\nproducer_redis_retry_for = 0\nwait_redis_outage = 0\n"
    path.write_text(REGISTRY.format(url=url) + tunables)
    return Drover(load_settings(path), notice=lambda _: None)


def one_line(exc: BaseException) -> str:
    said = str(exc)
    assert said and "\n" not in said, repr(said)
    return said


def refused(call: Callable[[], Any], kind: type[Exception] = BadArgument) -> str:
    """What `call` was refused with (one line), raised within AT_ONCE_S."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(AT_ONCE_S)
    assert outcome, f"still running after {AT_ONCE_S}s"
    error = outcome[0]
    assert isinstance(error, kind), repr(error)
    return one_line(error)


def nothing_written(store: JobStore) -> None:
    assert store.r.keys("*") == [], store.r.keys("*")


# ---- 1. a spec and keywords: never one of them silently dropped ----------------------------


@pytest.mark.parametrize(
    "keywords", [{"domain": "dirty-1", "bandwidth_mib": 5}, {"bogus": 1}, {"dry_run": True}]
)
def test_submit_refuses_a_spec_with_keywords(d: Drover, store: JobStore, keywords: Any) -> None:
    said = refused(lambda: d.submit(SPEC, **keywords))
    assert "not both" in said and all(k in said for k in keywords), said
    nothing_written(store)


def test_evacuate_refuses_a_spec_with_keywords(d: Drover, store: JobStore) -> None:
    Liveness(store.r).heartbeat("kvm1", HEARTBEAT_S)
    said = refused(lambda: d.evacuate(EVACUATION, host="kvm2", max_parallel=3))
    assert "not both" in said and "host" in said and "max_parallel" in said, said
    assert EvacuationStore(store).active_ids() == []


# ---- 2. a caller's spec is validated again, from its fields --------------------------------


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"dst": "kvm1"}, "same host"),
        ({"offline": True}, "--offline and --live exclude each other"),
        ({"bandwidth_mib": -5}, "greater than or equal to 1"),
        ({"src": "nowhere"}, "nowhere"),  # the registry's check, as before
    ],
)
def test_a_spec_that_no_longer_validates_is_refused(
    d: Drover, store: JobStore, update: dict[str, Any], message: str
) -> None:
    said = refused(lambda: d.submit(SPEC.model_copy(update=update)), SubmitError)
    assert message in said, said
    nothing_written(store)


def test_an_evacuation_spec_that_no_longer_validates_is_refused(d: Drover, store: JobStore) -> None:
    Liveness(store.r).heartbeat("kvm1", HEARTBEAT_S)
    bad = EVACUATION.model_copy(update={"to": ["kvm1"]})
    assert "--to includes kvm1" in refused(lambda: d.evacuate(bad), SubmitError)
    unknown = EVACUATION.model_copy(update={"to": ["nowhere"]})
    assert "nowhere" in refused(lambda: d.evacuate(unknown), SubmitError)
    assert EvacuationStore(store).active_ids() == []


def test_a_spec_made_without_validation_is_refused(d: Drover, store: JobStore) -> None:
    unchecked = MigrationSpec.model_construct(domain="web01", dst="kvm2")
    assert "Field required" in refused(lambda: d.submit(unchecked), SubmitError)
    nothing_written(store)


def test_a_valid_spec_given_is_submitted_as_it_is(d: Drover) -> None:
    spec = SPEC.model_copy(update={"bandwidth_mib": 5})
    assert d.job(d.submit(spec)).spec == spec


# ---- 3. Redis out of reach: BrokerUnavailable from every public method ----------------------

DOWN_CALLS: dict[str, Callable[[Drover], Any]] = {
    "submit": lambda d: d.submit(SPEC),
    "jobs": lambda d: d.jobs(),
    "job": lambda d: d.job("0123456789ab"),
    "record": lambda d: d.record("0123456789ab"),
    "events": lambda d: list(d.events("0123456789ab")),
    "events follow": lambda d: list(d.events("0123456789ab", follow=True)),
    "wait": lambda d: d.wait("0123456789ab"),
    "wait_evacuation": lambda d: d.wait_evacuation("0123456789ab"),
    "evacuation": lambda d: d.evacuation("0123456789ab"),
    "abort": lambda d: d.abort("0123456789ab"),
    "abort_evacuation": lambda d: d.abort_evacuation("0123456789ab"),
    "start_postcopy": lambda d: d.start_postcopy("0123456789ab"),
    "force_complete": lambda d: d.force_complete("0123456789ab"),
    "tune": lambda d: d.tune("0123456789ab", bandwidth_mib=5),
    "hosts": lambda d: d.hosts(),
    "set_host_enabled": lambda d: d.set_host_enabled("kvm1", False),
    "enable": lambda d: d.set_host_enabled("kvm1", True),
    "admit": lambda d: d.admit(),
    "evacuate": lambda d: d.evacuate(EVACUATION),
}


@pytest.mark.parametrize("name", sorted(DOWN_CALLS))
def test_every_method_reports_redis_out_of_reach_as_broker_unavailable(
    down: Drover, name: str
) -> None:
    said = refused(lambda: DOWN_CALLS[name](down), BrokerUnavailable)
    assert "127.0.0.1:" in said and "sekret" not in said, said


# ---- 4. a program's error is never an outage ------------------------------------------------


def test_only_connection_errors_are_outages() -> None:
    url = "redis://:sekret@127.0.0.1:6390/0"
    for outage in (
        redis.ConnectionError("Error 111 connecting"),
        redis.TimeoutError("Timeout reading from socket"),
        kombu.exceptions.OperationalError("Error 111 connecting"),
        ConnectionRefusedError(111, "Connection refused"),
    ):
        with pytest.raises(BrokerUnavailable) as info, broker_errors(url):
            raise outage
        assert "127.0.0.1:6390" in one_line(info.value) and "sekret" not in str(info.value)
    for error in (
        AttributeError("'str' object has no attribute 'host'"),
        redis.DataError("start and num must both be specified"),
        redis.ResponseError("WRONGTYPE Operation against a key"),
        TypeError("unhashable type: 'list'"),
    ):
        with pytest.raises(type(error)), broker_errors(url):
            raise error


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: d.evacuate(spec="x"), "spec must be EvacuationSpec, not str"),
        (lambda d: d.submit(spec={"domain": "web01"}), "spec must be MigrationSpec, not dict"),
        (lambda d: d.submit("web01"), "spec must be MigrationSpec, not str"),
        (lambda d: d.jobs(limit=None), "limit must be an int"),
    ],
)
def test_argument_errors_are_not_outages(
    d: Drover, store: JobStore, call: Callable[[Drover], Any], message: str
) -> None:
    assert message in refused(lambda: call(d))
    nothing_written(store)


# ---- 5 and 6. types and bounds, as the CLI's -------------------------------------------------

# Typed as the API's callers may not be: each argument is what a script could pass.
BAD_CALLS: list[tuple[Callable[[Any], Any], str]] = [
    (lambda d: d.jobs(limit="5"), "limit must be an int from 1 to 10000, not '5'"),
    (lambda d: d.jobs(limit=True), "limit must be an int"),
    (lambda d: d.jobs(limit=0), "limit must be an int from 1 to 10000, not 0"),
    (lambda d: d.jobs(limit=-1), "not -1"),
    (lambda d: d.jobs(limit=MAX_LIMIT + 1), f"not {MAX_LIMIT + 1}"),
    (lambda d: d.jobs(states=None), "states must be list or tuple or set or frozenset"),
    (lambda d: d.jobs(states="failed"), "not str"),
    (lambda d: d.jobs(states=[1]), "each of states must be str, not int"),
    (lambda d: d.jobs(since=5), "since must be str or None, not int"),
    (lambda d: d.jobs(host=["kvm1"]), "host must be str or None, not list"),
    (lambda d: d.jobs(bogus=1), "unknown filter 'bogus'"),
    (lambda d: d.jobs(now=None), "unknown filter 'now'"),
    (lambda d: d.wait("0123456789ab", timeout="5"), "timeout must be int or float or None"),
    (lambda d: d.wait("0123456789ab", timeout=math.nan), "finite number of seconds, not nan"),
    (lambda d: d.wait("0123456789ab", timeout=math.inf), "finite number of seconds, not inf"),
    (lambda d: d.wait("0123456789ab", timeout=-1), "above 0 seconds, not -1"),
    (lambda d: d.wait("0123456789ab", timeout=0), "above 0 seconds, not 0"),
    (lambda d: d.wait("0123456789ab", timeout=True), "not bool"),
    (lambda d: d.wait_evacuation("0123456789ab", timeout=math.nan), "not nan"),
    (lambda d: d.events("0123456789ab", follow=True, timeout="x"), "timeout must be int"),
    (lambda d: d.events("0123456789ab", follow="yes"), "follow must be bool, not str"),
    (lambda d: d.events("0123456789ab", timeout=5), "timeout applies only with follow=True"),
    (lambda d: d.job(5), "job_id must be str, not int"),
    (lambda d: d.record(None), "job_id must be str, not NoneType"),
    (lambda d: d.abort(b"0123456789ab"), "job_id must be str, not bytes"),
    (lambda d: d.set_host_enabled(["x"], False), "host must be str, not list"),
    (lambda d: d.set_host_enabled("kvm1", "no"), "enabled must be bool, not str"),
    (lambda d: d.set_host_enabled("kvm1", 0), "enabled must be bool, not int"),
    (lambda d: d.set_host_enabled("kvm1", False, reason=5), "reason must be str or None"),
    (lambda d: d.set_host_enabled("kvm1", True, reason="x"), "only with disabling"),
    (lambda d: d.tune("0123456789ab", bandwidth_mib="5"), "bandwidth_mib must be int or None"),
    (lambda d: d.tune("0123456789ab", max_downtime_ms=5.0), "max_downtime_ms must be int"),
    (lambda d: d.tune("0123456789ab", postcopy_bandwidth_mib=True), "not bool"),
    (lambda d: d.evacuate(EVACUATION, origin=5), "origin must be str or None, not int"),
]


@pytest.mark.parametrize(("call", "message"), BAD_CALLS)
def test_wrong_types_and_bounds_are_refused_in_one_line(
    d: Drover, store: JobStore, call: Callable[[Any], Any], message: str
) -> None:
    assert message in refused(lambda: call(d))
    nothing_written(store)


def test_a_drover_of_wrong_arguments_is_refused(config: Path) -> None:
    assert "settings must be Settings or None, not str" in refused(lambda: Drover("x"))  # type: ignore[arg-type]
    notice = refused(lambda: Drover(load_settings(config), notice="x"))  # type: ignore[arg-type]
    assert "notice must be callable" in notice


def test_a_truthy_string_never_enables_a_host(d: Drover, store: JobStore) -> None:
    d.set_host_enabled("kvm1", False, reason="disk swap")
    refused(lambda: d.set_host_enabled("kvm1", "no"))  # type: ignore[arg-type]
    assert "kvm1" in Maintenance(store.r).disabled()


def test_the_arguments_the_cli_gives_still_pass(d: Drover, store: JobStore) -> None:
    job_id = store.create(SPEC, host="test")
    assert [j.id for j in d.jobs(limit=MAX_LIMIT, states=("queued",), host="kvm1")] == [job_id]
    assert [j.id for j in d.jobs(1, states={"queued"}, since="30m")] == [job_id]
    assert d.set_host_enabled("kvm1", False, reason="disk swap").startswith("kvm1 disabled")
    assert d.set_host_enabled("kvm1", True) == "kvm1 enabled"
    assert [e["event"] for e in d.events(job_id)] == [e["event"] for e in d.events(job_id)]
    with pytest.raises(TimeoutError):
        d.wait(job_id, timeout=0.2)
