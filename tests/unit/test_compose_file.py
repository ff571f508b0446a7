"""docker-compose.yml is a valid Compose file and keeps the settings drover depends on.

Validated with jsonschema against the official Compose Specification schema, which
tests/support/compose_schema.py fetches from a package registry once and caches.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

from config.redis_acl import HEALTH_USER, ROLES, user_name
from tests.support import compose_schema

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CONFIG_IN_CONTAINER = "/etc/drover/drover.toml"
DROVER_SERVICES = ("beat", "exporter", "flower", "producer", "worker")
# Each drover service and the Redis user (config/redis_acl.py) it connects as. The fleet
# exporter reads and holds its lease as the producer (docs/redis-acl.md): the one shared user.
SERVICE_ROLES = {"beat": "beat", "flower": "flower", "producer": "producer", "worker": "worker"}
SHARED_ROLES = {"exporter": "producer"}
SIGNING_DIR, TRUSTED_DIR = "/etc/drover/signing", "/etc/drover/trusted"
REDIS_PORT, REDIS_TLS_PORT = "6379", "6380"
# Services run from images of their own, not drover's.
THIRD_PARTY_IMAGES = ("redis:", "prom/prometheus:")
PROMETHEUS_DIR = "/etc/prometheus"

# What an operator's .env holds (see the comments at the top of docker-compose.yml).
SAMPLE_ENV = {
    **{f"DROVER_REDIS_{role.upper()}_PASSWORD": f"{role}-0123456789abcdef" for role in ROLES},
    "DROVER_REDIS_HOST": "redis.example.org",
    "DROVER_HOST": "kvm-07",
    "DROVER_FLOWER_AUTH": "admin:secret",
}


_support = compose_schema


# --- Compose's variable interpolation, enough of it for this file -------------------

_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


class MissingVariable(Exception):
    pass


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op is not None and op.endswith("?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op is not None and op.endswith("-") and unset:
            return arg
        return current or ""

    return _VAR.sub(substitute, value)


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = _support.compose_schema()
    return loaded


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    # Named, not taken from "$schema": jsonschema does not know the https spelling of the
    # draft-07 URI and would fall back to 2020-12, whose $ref rules differ.
    jsonschema.Draft7Validator.check_schema(schema)
    # No format checker: Compose's own formats ("duration", "ports") are not JSON Schema's.
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def raw_text() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as f:
        loaded: dict[str, Any] = yaml.safe_load(f)  # resolves the x- anchors and << merges
    return loaded


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The file as Compose sees it: variables interpolated from an operator's .env."""
    interpolated: dict[str, Any] = _interpolate(raw, SAMPLE_ENV)
    return interpolated


def _errors(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    ]


def _volumes(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Service volumes in long syntax, whichever syntax the file uses."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append(v)
            continue
        source, target, *mode = v.split(":")
        out.append({"source": source, "target": target, "read_only": mode == ["ro"]})
    return out


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _argv(service: dict[str, Any], key: str) -> list[str]:
    value = service.get(key, [])
    return value.split() if isinstance(value, str) else list(value)


# --- schema validation ---------------------------------------------------------------
# The schema comes from the npm registry on first use (npm, the network): `lab`, with what
# needs the machine's set-up; the checks below it run anywhere.

NEEDS_NPM = pytest.mark.lab


@NEEDS_NPM
def test_schema_is_the_compose_specification(schema: dict[str, Any]) -> None:
    assert schema["title"] == "Compose Specification"
    assert schema["$id"] == "compose_spec.json"
    assert schema["$schema"] == "https://json-schema.org/draft-07/schema"


@NEEDS_NPM
def test_compose_file_is_valid_as_written(
    validator: jsonschema.protocols.Validator, raw: dict[str, Any]
) -> None:
    assert _errors(validator, raw) == []


@NEEDS_NPM
def test_compose_file_is_valid_once_interpolated(
    validator: jsonschema.protocols.Validator, compose: dict[str, Any]
) -> None:
    assert _errors(validator, compose) == []


@NEEDS_NPM
def test_invalid_key_fails_validation(
    validator: jsonschema.protocols.Validator, compose: dict[str, Any]
) -> None:
    broken = copy.deepcopy(compose)
    worker = broken["services"]["worker"]
    worker["network-mode"] = worker.pop("network_mode")  # a plausible typo
    errors = _errors(validator, broken)
    assert errors, "the schema accepted an unknown service key"
    assert any("network-mode" in e for e in errors), errors


def test_required_variables_have_no_silent_default(raw: dict[str, Any]) -> None:
    for name in SAMPLE_ENV:
        env = {k: v for k, v in SAMPLE_ENV.items() if k != name}
        with pytest.raises(MissingVariable, match=name):
            _interpolate(raw, env)


# --- what drover depends on ----------------------------------------------------------


def test_redis_keeps_an_append_only_file_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis"
    command = _argv(redis, "command")
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    data = [v for v in _volumes(redis) if v["target"] == "/data"]
    assert len(data) == 1
    assert data[0]["source"] in (compose.get("volumes") or {})
    assert redis["healthcheck"]["test"]
    assert redis["restart"] == "unless-stopped"


def test_redis_is_published_on_no_host_interface(compose: dict[str, Any]) -> None:
    """Only the compose network reaches it: no ports, no host networking, and no other
    service maps Redis's port either."""
    redis = compose["services"]["redis"]
    assert "ports" not in redis
    assert "network_mode" not in redis
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            published = str(mapping.get("target", "") if isinstance(mapping, dict) else mapping)
            assert not published.endswith((REDIS_PORT, REDIS_TLS_PORT)), (name, mapping)


def test_redis_requires_the_acl_users_from_a_secret_file(compose: dict[str, Any]) -> None:
    """The users come from `drover redis-acl`'s file, mounted as a secret; no password in
    Redis's command line or environment, so none in `docker inspect` or `ps`."""
    redis = compose["services"]["redis"]
    command = _argv(redis, "command")
    assert "--requirepass" not in command
    acl = command[command.index("--aclfile") + 1]
    assert acl == "/run/secrets/redis_acl"
    assert redis["secrets"] == ["redis_acl"]
    source = compose["secrets"]["redis_acl"]["file"]
    assert (ROOT / source).resolve().is_relative_to(ROOT / "secrets")
    assert re.search(r"^/secrets/$", (ROOT / ".gitignore").read_text(), re.M)  # never committed
    seen = " ".join(command) + " ".join(_env(redis).values())
    assert not any(password in seen for password in SAMPLE_ENV.values())
    health = " ".join(_argv(redis["healthcheck"], "test"))
    assert f"--user {HEALTH_USER}" in health and "ping" in health


def test_tls_for_redis_is_written_out_ready_to_uncomment(raw_text: str) -> None:
    """Redis's own TLS (tls-port, the CA), the TLS port the only one to publish."""
    tls = re.findall(r"^\s*#\s*- (--tls-[a-z-]+)$", raw_text, re.M)
    assert tls == [
        "--tls-port",
        "--tls-cert-file",
        "--tls-key-file",
        "--tls-ca-cert-file",
        "--tls-auth-clients",
    ]
    assert re.search(
        rf"^\s*#\s+- \"\$\{{DROVER_REDIS_TLS_BIND:-[0-9.]+\}}:{REDIS_TLS_PORT}:", raw_text, re.M
    )
    assert re.search(r"^\s*#\s+file: ./secrets/redis-tls/ca.pem$", raw_text, re.M)


def test_every_drover_service_is_its_own_redis_user(compose: dict[str, Any]) -> None:
    users = {}
    for name, role in SERVICE_ROLES.items():
        url = urlsplit(_env(compose["services"][name])["DROVER_REDIS_URL"])
        assert url.username == user_name(role), name
        assert url.password == SAMPLE_ENV[f"DROVER_REDIS_{role.upper()}_PASSWORD"], name
        users[name] = url.username
    assert len(set(users.values())) == len(users)
    for name, role in SHARED_ROLES.items():
        url = urlsplit(_env(compose["services"][name])["DROVER_REDIS_URL"])
        assert (url.username, url.hostname) == (user_name(role), "redis"), name


def test_worker_reaches_redis_over_verified_tls(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    url = urlsplit(_env(worker)["DROVER_REDIS_URL"])
    assert url.scheme == "rediss"
    assert (url.hostname, str(url.port)) == (SAMPLE_ENV["DROVER_REDIS_HOST"], REDIS_TLS_PORT)
    query = parse_qs(url.query)
    assert query["ssl_cert_reqs"] == ["required"]
    (ca,) = query["ssl_ca_certs"]
    mounts = [v for v in _volumes(worker) if ca.startswith(v["target"] + "/")]
    assert len(mounts) == 1 and mounts[0]["read_only"] is True


@pytest.mark.parametrize("name", DROVER_SERVICES)
def test_signing_key_and_cert_store_are_mounted_read_only(
    compose: dict[str, Any], name: str
) -> None:
    volumes = {v["target"]: v for v in _volumes(compose["services"][name])}
    for target in (SIGNING_DIR, TRUSTED_DIR):
        assert volumes[target]["read_only"] is True, target


def test_the_mounted_config_turns_signing_on(compose: dict[str, Any]) -> None:
    """The config every service mounts by default (deploy/drover.toml) signs messages with
    the key, certificate and cert store of the read-only mounts, and holds no password."""
    sources = {
        v["source"]
        for name in DROVER_SERVICES
        for v in _volumes(compose["services"][name])
        if v["target"] == CONFIG_IN_CONTAINER
    }
    (source,) = sources
    config = tomllib.loads((ROOT / source).read_text())
    security = config["security"]
    assert security["signing"] is True
    assert Path(security["key"]).parent == Path(SIGNING_DIR)
    assert Path(security["certificate"]).parent == Path(SIGNING_DIR)
    assert security["cert_store"] == TRUSTED_DIR
    assert "@" not in config["redis_url"]  # each service's own user comes from DROVER_REDIS_URL
    assert config["hosts"]


def test_flower_runs_drover_flower_after_redis_is_healthy(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert "entrypoint" not in flower  # the image's: `drover`
    argv = _argv(flower, "command")
    assert argv[:5] == ["flower", "--address", "0.0.0.0", "--port", "5555"]
    assert argv[5:] == ["--allowed-host", "localhost"]  # DROVER_FLOWER_HOST unset
    assert "DROVER_FLOWER_AUTH" in flower["environment"]  # it refuses 0.0.0.0 without auth
    assert not any(name.startswith("FLOWER_") for name in flower["environment"])  # refused
    assert any(p.split(":")[-2:] == ["5555", "5555"] for p in flower["ports"])
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"


def test_producer_runs_on_demand_only(compose: dict[str, Any]) -> None:
    producer = compose["services"]["producer"]
    assert producer["profiles"] == ["tools"]
    assert "entrypoint" not in producer  # the image's: `drover`
    assert "restart" not in producer


def test_worker_runs_on_the_hypervisor(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert worker["network_mode"] == "host"
    assert "ports" not in worker and "networks" not in worker  # both clash with host mode
    assert _argv(worker, "command") == ["worker", "--host", SAMPLE_ENV["DROVER_HOST"]]
    assert worker["restart"] == "unless-stopped"
    volumes = {v["target"]: v for v in _volumes(worker)}
    assert volumes["/run/libvirt"]["source"] == "/run/libvirt"
    assert not volumes["/run/libvirt"].get("read_only", False)
    assert f"@{SAMPLE_ENV['DROVER_REDIS_HOST']}:" in _env(worker)["DROVER_REDIS_URL"]


@pytest.mark.parametrize("name", DROVER_SERVICES)
def test_drover_services_read_the_config_read_only(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    assert _env(service)["DROVER_CONFIG"] == CONFIG_IN_CONTAINER
    config = [v for v in _volumes(service) if v["target"] == CONFIG_IN_CONTAINER]
    assert len(config) == 1
    assert config[0]["read_only"] is True


def test_every_service_of_the_drover_image_builds_from_the_dockerfile(
    compose: dict[str, Any],
) -> None:
    images = {
        name: service["image"]
        for name, service in compose["services"].items()
        if not service["image"].startswith(THIRD_PARTY_IMAGES)
    }
    assert set(images) == set(DROVER_SERVICES)
    assert len(set(images.values())) == 1, images  # one image for every role
    for name in images:
        build = compose["services"][name]["build"]
        assert (ROOT / build["context"]).resolve() == ROOT, name
        dockerfile = ROOT / build["context"] / build.get("dockerfile", "Dockerfile")
        assert dockerfile.resolve() == DOCKERFILE, name
    assert DOCKERFILE.is_file()
    assert re.search(r"^ENTRYPOINT \[\"drover\"\]$", DOCKERFILE.read_text(), re.M)


def test_beat_fires_schedules_after_redis_is_healthy(compose: dict[str, Any]) -> None:
    beat = compose["services"]["beat"]
    assert "entrypoint" not in beat  # the image's: `drover`
    assert _argv(beat, "command") == ["beat"]
    assert beat["depends_on"]["redis"]["condition"] == "service_healthy"
    assert beat["restart"] == "unless-stopped"  # it exits when Redis goes away


def test_prometheus_scrapes_with_drovers_rules_on_loopback_only(compose: dict[str, Any]) -> None:
    """A pinned Prometheus image, deploy/prometheus/'s config and alert rules mounted
    read-only where the config looks for them, its data on a named volume, published on
    127.0.0.1 only (Prometheus has no authentication of its own)."""
    prometheus = compose["services"]["prometheus"]
    name, _, tag = prometheus["image"].partition(":")
    assert name == "prom/prometheus"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), tag  # a release, never :latest
    argv = _argv(prometheus, "command")
    config_target = f"{PROMETHEUS_DIR}/prometheus.yml"
    assert f"--config.file={config_target}" in argv
    mounts = {v["target"]: v for v in _volumes(prometheus)}
    for target in (config_target, f"{PROMETHEUS_DIR}/alerts.yml"):
        assert mounts[target]["read_only"] is True, target
        assert (ROOT / mounts[target]["source"]).is_file(), target
    config = yaml.safe_load((ROOT / mounts[config_target]["source"]).read_text())
    for rule_file in config["rule_files"]:  # relative to the config's directory
        assert f"{PROMETHEUS_DIR}/{rule_file}" in mounts, rule_file
    (data,) = [v for v in _volumes(prometheus) if v["target"] == "/prometheus"]
    assert data["source"] in (compose.get("volumes") or {})
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"]
    assert prometheus["restart"] == "unless-stopped"


def test_exporter_serves_the_compose_network_only(compose: dict[str, Any]) -> None:
    """`drover exporter` on every address of its container (it refuses that without
    --expose-all), published on no host interface: prometheus.yml's exporter:9640."""
    exporter = compose["services"]["exporter"]
    assert "entrypoint" not in exporter  # the image's: `drover`
    assert _argv(exporter, "command") == ["exporter", "--listen", "0.0.0.0:9640", "--expose-all"]
    assert "ports" not in exporter and "network_mode" not in exporter
    assert exporter["depends_on"]["redis"]["condition"] == "service_healthy"
    assert exporter["restart"] == "unless-stopped"
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        c["job_name"]: [t for sc in c["static_configs"] for t in sc["targets"]]
        for c in config["scrape_configs"]
    }
    assert targets["drover-exporter"] == ["exporter:9640"]
