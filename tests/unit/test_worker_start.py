"""Secure by default: a worker on a config without signing refuses to start, in one line,
whichever way it is started, unless the config says `[security] insecure = true`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from tests.conftest import RedisServer
from tests.support.cli import run_drover
from worker.main import UNSIGNED_REFUSAL

START_TIMEOUT_S = 60


def test_drover_worker_refuses_to_start_unsigned(config: Path, redis_srv: RedisServer) -> None:
    result = run_drover(config, "worker", "--host", "kvm1")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [f"drover: {UNSIGNED_REFUSAL}"], result.stderr[-2000:]
    assert not redis.Redis.from_url(redis_srv.url).keys("*")  # it never reached Redis


def test_celery_worker_refuses_to_start_unsigned(config: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DROVER_CONFIG": str(config)}
    env.pop("DROVER_REDIS_URL", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "-Q",
            "drover.host.kvm1",
            "--hostname",
            "drover@kvm1",
            "--pool",
            "solo",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=START_TIMEOUT_S,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode != 0
    assert UNSIGNED_REFUSAL in result.stderr


def test_an_insecure_config_gets_past_the_check_and_says_so(config: Path) -> None:
    config.write_text(config.read_text() + "\n[security]\ninsecure = true\n")
    result = run_drover(config, "worker", "--host", "kvm1")
    # kvm1's libvirtd does not exist: the worker stops there, past the signing check.
    assert UNSIGNED_REFUSAL not in result.stderr
    assert "libvirt" in result.stderr
