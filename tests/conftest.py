"""Fixtures shared by every test: a real, private redis-server (AOF on) started by the tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import resident
from lab import redis_server
from lab.proc import kill

pytest_plugins = ["tests.support.lab_fixtures"]

# A `drover` a test runs never starts a cli-server of its own (cli/autostart.py): one would
# outlive its test and serve the next ones. The tests of that start theirs with `auto`.
if os.environ.get(resident.SWITCH_ENV, "").strip().lower() != resident.OFF:
    os.environ[resident.SWITCH_ENV] = resident.MANUAL

# Everything here needs root and the lab; each module says so (`pytestmark = pytest.mark.lab`)
# so that `pytest -m "not lab"` runs all the rest as an ordinary user.
LAB_TEST_DIRS = ("lab", "faults")
TESTS_ROOT = Path(__file__).resolve().parent


# `pytest -m "not lab"`: what runs as any user, spread over this many processes (pytest-xdist).
# Most of its time is spent waiting (subprocesses, Redis round trips, polls), so more
# processes than cores pay; each process starts its own redis-server (`redis_srv`).
NOT_LAB = "not lab"
NOT_LAB_PROCESSES = 4


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Run the `-m "not lab"` selection in parallel unless told otherwise (`-n 0`, `-p
    no:xdist`); a lab run is spread only when asked (`-n`: each process brings its own lab
    up, tests/support/lab_fixtures.py), and the fault suite is not."""
    option = config.option
    if (
        config.pluginmanager.hasplugin("xdist")
        and not hasattr(config, "workerinput")  # an xdist worker itself: one process
        and getattr(option, "markexpr", "") == NOT_LAB
        and getattr(option, "numprocesses", None) is None
        and not getattr(option, "collectonly", False)
    ):
        option.numprocesses = NOT_LAB_PROCESSES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a lab or fault test without the `lab` marker: `-m "not lab"` would run it."""
    lab_dirs = [TESTS_ROOT / name for name in LAB_TEST_DIRS]
    unmarked = [
        item.nodeid
        for item in items
        if any(item.path.is_relative_to(d) for d in lab_dirs)
        and item.get_closest_marker("lab") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"lab tests without the `lab` marker: {unmarked[:5]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.password = redis_server.new_password()
        self.pid = 0

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.pid = redis_server.start(self.data_dir, self.port, ["127.0.0.1"], self.password)

    def stop(self) -> None:
        kill([self.pid])


@pytest.fixture(scope="session")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    yield srv
    srv.stop()
