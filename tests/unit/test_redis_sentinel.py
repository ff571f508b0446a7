"""redis_url naming a Sentinel set: checked once, in one line, and translated for each client.

The translations are read back the way each client reads them: kombu's Connection and its
sentinel channel options, redbeat's own `get_redis`, redis-py's Sentinel pools.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection
from redbeat.schedulers import get_redis
from redis.sentinel import SentinelConnectionPool

from config.celery import celery_config
from config.redis_acl import role_url
from config.redis_acl_model import redis_db
from config.redis_sentinel import (
    DEFAULT_SENTINEL_PORT,
    check_any_redis_url,
    kombu_broker,
    parse_sentinel_url,
    redbeat_settings,
)
from config.settings import ConfigError, Settings, load_settings
from jobs.connection import OutageRetry, client_for
from jobs.errors import redis_location
from jobs.replication import NO_WAIT
from jobs.store import JobStore
from schedules.beat import redbeat_config

SECRET = "hunter2-secret"
THREE = (
    f"sentinel://drover:{SECRET}@10.0.0.1:26379;sentinel://10.0.0.2:26380;"
    "sentinel://s3.example/2?master_name=fleet"
)


@pytest.mark.parametrize(
    "url",
    [
        THREE,
        "sentinel://10.0.0.1?master_name=m",
        f"sentinel://:{SECRET}@h1:1;sentinel://:{SECRET}@h2:2/0?master_name=m",  # same on all
        f"sentinel://u:{SECRET}%3Bx@[fd00::1]:26379;sentinel://h2?master_name=a.b-c_d",
        f"sentinel://u:{SECRET}@h1;sentinel://h2/?master_name=m&sentinel_auth=none",
    ],
)
def test_good_sentinel_urls_pass(url: str) -> None:
    assert check_any_redis_url(url, insecure=False) == url


def test_the_parts_read_back() -> None:
    s = parse_sentinel_url(THREE)
    assert s.sentinels == (
        ("10.0.0.1", 26379),
        ("10.0.0.2", 26380),
        ("s3.example", DEFAULT_SENTINEL_PORT),
    )
    assert (s.master_name, s.db, s.username, s.password) == ("fleet", 2, "drover", SECRET)
    assert s.sentinel_auth
    encoded = parse_sentinel_url("sentinel://u:a%3Bb%40c@h?master_name=m")
    assert encoded.password == "a;b@c"
    open_sentinels = parse_sentinel_url("sentinel://u:p@h?master_name=m&sentinel_auth=none")
    assert "credential_provider" not in open_sentinels.sentinel_kwargs()


BAD = {
    f"sentinel://:{SECRET}@h1": "names no master",
    f"sentinel://:{SECRET}@h1?": "names no master",
    f"sentinel://:{SECRET}@h1?master_name=": "master_name must be 1-64",
    f"sentinel://:{SECRET}@h1?master_name=a/b": "master_name must be",
    f"sentinel://:{SECRET}@h1?master_name=a%20b": "master_name must be",
    f"sentinel://:{SECRET}@h1?master_name=m&master_name=n": "repeats a query parameter",
    f"sentinel://:{SECRET}@h1?master_name=m&password={SECRET}": "'password' is not allowed",
    f"sentinel://:{SECRET}@h1?master_name=m&ssl_cert_reqs=required": "no TLS",
    f"sentinel://:{SECRET}@h1?master_name=m&sentinel_auth=maybe": "sentinel_auth must be",
    f"sentinel://:{SECRET}@h1?master_name=m&x": "malformed query",
    f"sentinel://:{SECRET}@h1:0?master_name=m": "sentinel 1 port '0' is not 1 to 65535",
    f"sentinel://:{SECRET}@h1:abc?master_name=m": "port 'abc'",
    f"sentinel://:{SECRET}@h1;sentinel://h2:99999?master_name=m": "sentinel 2 port '99999'",
    f"sentinel://:{SECRET}@h1/0;sentinel://h2?master_name=m": "sentinel 1 has a malformed host",
    f"sentinel://:{SECRET}@h1;sentinel://h1:26379?master_name=m": "names a sentinel twice",
    f"sentinel://:{SECRET}@h1;redis://h2?master_name=m": "host 'h1;redis' is not",
    f"sentinel://:{SECRET}@h1;;sentinel://h2?master_name=m": "host 'h1;' is not",
    f"sentinel://u:pa;{SECRET}@h1?master_name=m": "has ';' in its credentials: percent-encode",
    f"redis://h0;sentinel://:{SECRET}@h1?master_name=m": "percent-encode them",
    f"sentinel://:{SECRET}@h1;sentinel://:other@h2?master_name=m": "different credentials",
    f"sentinel://h1;sentinel://:{SECRET}@h2?master_name=m": "different credentials",
    f"sentinel://:{SECRET}/x@h1?master_name=m": "percent-encode them in the password",
    f"sentinel://:{SECRET}@h1/abc?master_name=m": "database '/abc' must be a number",
    f"sentinel://:{SECRET}@h1/0/1?master_name=m": "database '/0/1'",
    f"sentinel://:{SECRET}@h1/99999999999?master_name=m": "database",
    f"sentinel://:{SECRET}@h1?master_name=m#frag": "has a fragment",
    f"sentinel://:{SECRET}@h 1?master_name=m": "whitespace",
    f"sentinel://:{SECRET}@?master_name=m": "sentinel 1 has no host",
    f"sentinel://:{SECRET}@[10.0.0.1]?master_name=m": "brackets hold an IPv6 address only",
    f"sentinel://:{SECRET}@h;id?master_name=m": "host 'h;id' is not",
    f"sentinel://:{SECRET}@h1?master_name=m&u=@x": "'@' after '?'",
    ";".join(f"sentinel://h{i}" for i in range(17)) + "?master_name=m": "more than 16",
}


@pytest.mark.parametrize(("url", "expected"), BAD.items())
def test_hostile_sentinel_urls_are_refused_in_one_line(url: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        check_any_redis_url(url, insecure=True)
    message = str(info.value)
    assert message.startswith("redis_url "), message
    assert expected in message, message
    assert "\n" not in message
    assert SECRET not in message and "pa;" not in message


def test_settings_refuse_a_bad_sentinel_url_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "drover.toml"
    config.write_text(f'redis_url = "sentinel://:{SECRET}@h1"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert "names no master" in str(info.value) and SECRET not in str(info.value)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    config = tmp_path / "drover.toml"
    config.write_text(f'redis_url = "{THREE}"\n[security]\ninsecure = true\n')
    return load_settings(config)


def test_kombu_gets_every_sentinel_the_user_and_the_master_name(settings: Settings) -> None:
    conf = celery_config(settings)
    options = conf["broker_transport_options"]
    assert options["master_name"] == "fleet"
    provider = options["sentinel_kwargs"]["credential_provider"]
    assert provider.get_credentials() == ("drover", SECRET)
    assert SECRET not in repr(options)
    assert options["visibility_timeout"] == settings.tunables.broker_visibility_timeout
    conn = Connection(conf["broker_url"], transport_options=options)
    assert conn.transport_cls == "sentinel"
    assert [Connection(alt).hostname for alt in conn.alt] == ["10.0.0.1", "10.0.0.2", "s3.example"]
    assert (conn.userid, conn.password, conn.virtual_host) == ("drover", SECRET, "2")
    assert SECRET not in conn.as_uri()
    assert kombu_broker(THREE)[0].count(SECRET) == 1


def test_redbeat_builds_a_sentinel_client_on_the_set(settings: Settings) -> None:
    conf = redbeat_config(settings, retry_period=5.0)
    assert conf["redbeat_redis_url"].startswith("redis-sentinel://")
    assert SECRET not in conf["redbeat_redis_url"]
    app = Celery("t", set_as_current=False)
    app.conf.update(conf)
    client = get_redis(app)
    pool = client.connection_pool.proxy if hasattr(client.connection_pool, "proxy") else None
    sentinel = app.redbeat_sentinel  # type: ignore[attr-defined]
    addresses = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinel.sentinels
    ]
    assert addresses == list(parse_sentinel_url(THREE).sentinels)
    provider = sentinel.sentinels[0].connection_pool.connection_kwargs["credential_provider"]
    assert provider.get_credentials() == ("drover", SECRET)
    assert SECRET not in repr(sentinel.sentinels[0])
    kwargs = sentinel.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("drover", SECRET, 2)
    assert redbeat_settings(THREE)[1]["service_name"] == "fleet"
    del pool


def test_redis_py_client_is_the_masters_and_rides_out_a_failover() -> None:
    client = client_for(THREE, retry_for=30.0)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "fleet"
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("drover", SECRET, 2)
    assert isinstance(kwargs["retry"], OutageRetry)
    sentinel = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert sentinel["host"] == "10.0.0.1"
    assert sentinel["credential_provider"].get_credentials() == ("drover", SECRET)


def test_the_store_waits_for_a_replica_on_a_sentinel_set_only() -> None:
    store = JobStore.from_url(THREE, retry_for=1.0)
    assert store.replica_wait.replicas == 1 and store.replica_wait.timeout_ms > 0
    assert store.without_retry.replica_wait == store.replica_wait
    assert JobStore.from_url("redis://127.0.0.1:6379/0").replica_wait == NO_WAIT


def test_role_urls_db_and_locations_of_a_sentinel_set() -> None:
    url = role_url(THREE, "worker", "p" * 20)
    check_any_redis_url(url, insecure=False)
    s = parse_sentinel_url(url)
    assert (s.username, s.password, s.master_name, s.db) == ("drover-worker", "p" * 20, "fleet", 2)
    assert redis_db(THREE) == 2
    with pytest.raises(ConfigError):
        redis_db("sentinel://h1")
    location = redis_location(THREE)
    assert location == "sentinel master fleet via 10.0.0.1:26379,10.0.0.2:26380,s3.example:26379"
    assert redis_location("sentinel://:x@h1") == "a Sentinel set"
