"""`drover flower` refusing to start: one line on stderr, a non-zero exit, no traceback.

Each refusal comes before Flower would listen, so none of these runs a web server; a
command that started Flower instead would hit the subprocess timeout and fail the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer.cli import EXIT_FAILED, EXIT_USAGE
from tests.conftest import RedisServer, free_port
from tests.support.registry import REGISTRY

FLOWER_TIMEOUT_S = 60
SECRET = "s3cret-not-for-stderr"
BAD_AUTH = "--basic-auth (or FLOWER_BASIC_AUTH) must be USER:PASSWORD[,USER:PASSWORD...]"


def drover_flower(
    config: Path, *args: str, basic_auth: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`drover flower ARGS` with FLOWER_BASIC_AUTH set to `basic_auth`, or unset.

    The caller's own FLOWER_* variables are dropped: drover and Flower both read them.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env["DROVER_CONFIG"] = str(config)
    env.pop("DROVER_REDIS_URL", None)
    if basic_auth is not None:
        env["FLOWER_BASIC_AUTH"] = basic_auth
    return subprocess.run(
        [sys.executable, "-m", "producer", "flower", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=FLOWER_TIMEOUT_S,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("drover: "), lines
    return lines[0]


@pytest.fixture
def config(tmp_path: Path, redis_srv: RedisServer) -> Path:
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url=redis_srv.url))
    return path


@pytest.fixture
def no_redis(tmp_path: Path) -> Path:
    """A config whose Redis port nobody listens on."""
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url=f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"))
    return path


@pytest.mark.parametrize(
    "credentials",
    [
        "operator",  # no colon
        "operator:",  # no password
        f":{SECRET}",  # no user
        f"operator:{SECRET},guest",  # the second credential has no password
        "",
    ],
)
def test_malformed_basic_auth_is_refused(config: Path, credentials: str) -> None:
    result = drover_flower(config, "--basic-auth", credentials)
    assert result.returncode == EXIT_USAGE
    assert one_line(result) == f"drover: {BAD_AUTH}"
    assert SECRET not in result.stderr


def test_malformed_basic_auth_from_the_environment_is_refused(config: Path) -> None:
    result = drover_flower(config, "--address", "0.0.0.0", basic_auth=SECRET)
    assert result.returncode == EXIT_USAGE
    assert one_line(result) == f"drover: {BAD_AUTH}"
    assert SECRET not in result.stderr


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        ("0.0.0.0", "0.0.0.0"),
        ("::", "::"),
        ("10.20.0.9", "10.20.0.9"),
        ("flower.example.org", "flower.example.org"),  # a name may resolve to anything
        ("", "(all)"),  # Flower's "every interface"
    ],
)
def test_public_address_without_basic_auth_is_refused(
    config: Path, address: str, shown: str
) -> None:
    result = drover_flower(config, "--address", address)
    assert result.returncode == EXIT_USAGE
    line = one_line(result)
    assert line.startswith(f"drover: --address {shown} would show the fleet to the network")
    assert "--basic-auth USER:PASSWORD" in line and "FLOWER_BASIC_AUTH" in line


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "localhost"])
def test_loopback_needs_no_password_but_still_needs_redis(no_redis: Path, address: str) -> None:
    """Not refused for exposure: the next check, Redis, is what stops it here."""
    result = drover_flower(no_redis, "--address", address)
    assert result.returncode == EXIT_FAILED
    assert one_line(result).startswith("drover: cannot reach Redis at 127.0.0.1:")


def test_redis_unreachable_is_one_line_without_the_password(no_redis: Path) -> None:
    result = drover_flower(no_redis, "--address", "0.0.0.0", basic_auth=f"ops:{SECRET}x")
    assert result.returncode == EXIT_FAILED
    assert one_line(result).startswith("drover: cannot reach Redis at 127.0.0.1:")
    assert SECRET not in result.stderr + result.stdout


def test_wrong_redis_password_is_one_line(tmp_path: Path, redis_srv: RedisServer) -> None:
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url=f"redis://:{SECRET}@127.0.0.1:{redis_srv.port}/0"))
    result = drover_flower(path)
    assert result.returncode == EXIT_FAILED
    assert one_line(result) == "drover: Redis refused the password in the config (redis_url)"
    assert SECRET not in result.stderr + result.stdout
