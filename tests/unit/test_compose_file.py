"""docker-compose.yml is a valid Compose file and keeps the settings drover depends on.

Validated with jsonschema against the official Compose Specification schema, which
tests/support/compose_schema.py fetches from a package registry once and caches.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support import compose_schema

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CONFIG_IN_CONTAINER = "/etc/drover/drover.toml"
DROVER_SERVICES = ("beat", "flower", "producer", "worker")

# What an operator's .env holds (see the comments at the top of docker-compose.yml).
SAMPLE_ENV = {
    "DROVER_REDIS_PASSWORD": "0123456789abcdef",
    "DROVER_REDIS_HOST": "10.0.0.5",
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


def test_schema_is_the_compose_specification(schema: dict[str, Any]) -> None:
    assert schema["title"] == "Compose Specification"
    assert schema["$id"] == "compose_spec.json"
    assert schema["$schema"] == "https://json-schema.org/draft-07/schema"


def test_compose_file_is_valid_as_written(
    validator: jsonschema.protocols.Validator, raw: dict[str, Any]
) -> None:
    assert _errors(validator, raw) == []


def test_compose_file_is_valid_once_interpolated(
    validator: jsonschema.protocols.Validator, compose: dict[str, Any]
) -> None:
    assert _errors(validator, compose) == []


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
    assert command[command.index("--requirepass") + 1] == SAMPLE_ENV["DROVER_REDIS_PASSWORD"]
    data = [v for v in _volumes(redis) if v["target"] == "/data"]
    assert len(data) == 1
    assert data[0]["source"] in (compose.get("volumes") or {})
    assert redis["healthcheck"]["test"]
    assert redis["restart"] == "unless-stopped"


def test_flower_runs_drover_flower_after_redis_is_healthy(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert "entrypoint" not in flower  # the image's: `drover`
    argv = _argv(flower, "command")
    assert argv == ["flower", "--address", "0.0.0.0", "--port", "5555"]
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
    assert _env(service)["DROVER_REDIS_URL"].startswith("redis://:")


def test_every_service_of_the_drover_image_builds_from_the_dockerfile(
    compose: dict[str, Any],
) -> None:
    images = {
        name: service["image"]
        for name, service in compose["services"].items()
        if not service["image"].startswith("redis:")
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
