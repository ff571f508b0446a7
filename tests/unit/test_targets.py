"""A --migrate-uri goes only to its destination's registered migration addresses or socket dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from config.settings import Host, load_settings
from jobs.spec import MigrationSpec
from jobs.targets import migration_uri_problem
from producer.api import Drover, SubmitError
from tests.conftest import RedisServer

KVM3 = Host(
    name="kvm3",
    peer_uri="qemu+tcp://192.0.2.3/system",
    migration_address="192.0.2.3",
    migration_addresses=["2001:db8::3", "KVM3-mig.example", "fe80::3%eth1"],
    migration_socket_dir="/run/drover/migrate",
)
BARE = Host(name="kvm2", peer_uri="qemu+tcp://192.0.2.2/system", migration_address="192.0.2.2")


@pytest.mark.parametrize(
    "uri",
    [
        "tcp://192.0.2.3",
        "tcp://192.0.2.3:4444/",
        "rdma://192.0.2.3",
        "tcp://[2001:db8::3]",
        "tcp://[2001:0db8:0:0::3]:49152",  # the same address, spelled longer
        "tcp://kvm3-mig.example",  # DNS names compare without case
        "tcp://KVM3-MIG.EXAMPLE:4444",
        "tcp://[::ffff:192.0.2.3]",  # IPv4-mapped: the same endpoint
        "tcp://[fe80::3%eth1]:4444",
        "unix:///run/drover/migrate/kvm3.sock",
        "unix:///run/drover/migrate/a/b.sock",
        "unix:///run/drover//migrate/./c.sock",  # the same path once normalised
    ],
)
def test_uris_toward_the_destination_are_allowed(uri: str) -> None:
    assert migration_uri_problem(uri, KVM3) is None


@pytest.mark.parametrize(
    ("uri", "dst", "message"),
    [
        ("tcp://attacker.example:4444", KVM3, "kvm3 receives migrations only at 192.0.2.3, "),
        ("tcp://169.254.169.254:80", KVM3, "2001:db8::3, KVM3-mig.example, fe80::3%eth1"),
        ("tcp://169.254.169.254:80", BARE, "kvm2 receives migrations only at 192.0.2.2 ("),
        ("rdma://192.0.2.30", KVM3, "only at 192.0.2.3"),
        ("tcp://192.0.2.2", KVM3, "only at 192.0.2.3"),  # another host's address
        ("tcp://[::ffff:169.254.169.254]", KVM3, "only at"),
        ("tcp://[fe80::3%eth2]", KVM3, "only at"),  # another interface's link
        ("tcp://[fe80::3]", KVM3, "only at"),  # link-local without its interface
        ("tcp://kvm3-mig.example.attacker.example", KVM3, "only at"),
        ("tcp://192.0.2.3.nip.io", KVM3, "only at"),
        ("unix:///etc/shadow", KVM3, "must name a path under /run/drover/migrate/"),
        ("unix:///run/drover/migrate", KVM3, "under /run/drover/migrate/"),  # the dir itself
        ("unix:///run/drover/migrate/", KVM3, "under /run/drover/migrate/"),
        ("unix:///run/drover/migrate-evil/x.sock", KVM3, "under /run/drover/migrate/"),
        ("unix:////run/drover/migrate/x.sock", KVM3, "under /run/drover/migrate/"),
        ("unix:///etc/shadow", BARE, "kvm2 has no migration_socket_dir in the registry"),
        ("unix:///run/drover/migrate/x.sock", BARE, "tcp:// or rdma:// to 192.0.2.2 only"),
        ("unix:///run/drover/migrate/../x", KVM3, "must be tcp://HOST[:PORT]"),
        ("tcp://[10.0.0.1]", KVM3, "brackets hold an IPv6 address only"),
        ("qemu+ext:///system?command=/bin/sh", KVM3, "must be tcp://HOST[:PORT]"),
    ],
)
def test_uris_anywhere_else_are_refused_in_one_line(uri: str, dst: Host, message: str) -> None:
    problem = migration_uri_problem(uri, dst)
    assert problem is not None and message in problem, problem
    assert "\n" not in problem


# ---- the producer refuses before anything is written -----------------------------------------

REGISTRY_WITH_KVM3 = """
redis_url = "{url}"

[hosts.kvm1]
peer_uri = "qemu+tcp://192.0.2.1/system"
migration_address = "192.0.2.1"

[hosts.kvm3]
peer_uri = "qemu+tcp://192.0.2.3/system"
migration_address = "192.0.2.3"
migration_socket_dir = "/run/drover/migrate"
"""


@pytest.fixture
def drover(tmp_path: Path, redis_srv: RedisServer) -> Drover:
    redis.Redis.from_url(redis_srv.url).flushdb()
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY_WITH_KVM3.format(url=redis_srv.url))
    return Drover(load_settings(path))


def request(uri: str) -> dict[str, object]:
    return {"domain": "idle-1", "src": "kvm1", "dst": "kvm3", "migrate_uri": uri}


@pytest.mark.parametrize("uri", ["tcp://attacker.example:4444", "unix:///etc/shadow"])
def test_the_python_api_refuses_before_writing(
    drover: Drover, redis_srv: RedisServer, uri: str
) -> None:
    with pytest.raises(SubmitError, match="--migrate-uri"):
        drover.spec(**request(uri))
    with pytest.raises(SubmitError, match="--migrate-uri"):
        drover.submit(**request(uri))
    # A spec the caller built itself is checked at submit too.
    with pytest.raises(SubmitError, match="--migrate-uri"):
        drover.submit(MigrationSpec.model_validate(request(uri)))
    assert redis.Redis.from_url(redis_srv.url).keys("*") == []


@pytest.mark.parametrize("uri", ["tcp://192.0.2.3:4444", "unix:///run/drover/migrate/m.sock"])
def test_the_python_api_accepts_the_destinations_own_targets(drover: Drover, uri: str) -> None:
    assert drover.spec(**request(uri)).migrate_uri == uri
