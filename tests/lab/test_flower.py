"""Flower watching the real lab through `drover flower`: workers, host queues, a migration.

Flower learns workers and tasks only from live events, so it starts before the migration.
Workers obey no remote control (docs/security.md), so Flower shows them from their events
(heartbeats, task events) and the host queues from the broker: the test finds each host's
worker alive, each host's queue, and every phase task of the migration with its job id, host
and state. Then headless Chromium loads the dashboard, as an operator's browser would.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from config.celery import host_queue, worker_node
from config.redis_acl import FLOWER, ROLES
from jobs.phases import PHASE_ORDER, PHASE_SIDE, Phase, Side, task_name
from lab import control
from lab.layout import LabLayout
from tests.conftest import free_port
from tests.support.lab_fixtures import Lab, wait_for

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / ".cache" / "screenshots" / "flower-dashboard.png"
HOSTS = ("lab1", "lab2")
FLOWER_START_S = 60.0
# Workers send a heartbeat every 2 s; a few of them, on two busy cores.
EVENTS_LIVE_S = 30.0
TASKS_SEEN_S = 30.0
HTTP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
CHROMIUM_TIMEOUT_S = 120.0
WINDOW = (1400, 900)
# Lets the dashboard's scripts fill the workers table before the DOM is dumped.
VIRTUAL_TIME_BUDGET_MS = 5000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A blank 1400x900 page is about 6 KB as PNG; the dashboard with two workers about 60 KB.
MIN_SCREENSHOT_BYTES = 20_000
HARMLESS_QUEUE = "drover.flower-test.unused"
HTTP_UNAUTHORIZED = 401
HTTP_FORBIDDEN = 403


@dataclass
class Flower:
    base: str
    user: str
    password: str
    log: Path

    def request(self, path: str, *, method: str = "GET", auth: bool = True) -> tuple[int, str]:
        body = b"" if method == "POST" else None
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if auth:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.request(path)
        assert status == 200, f"GET {path}: {status} {body[:200]}"
        return json.loads(body)

    def browser_url(self, path: str = "/") -> str:
        host = self.base.split("://", 1)[1]
        return f"http://{self.user}:{self.password}@{host}{path}"


def _answers(flower: Flower) -> bool:
    try:
        return flower.request("/healthcheck", auth=False)[0] == 200
    except OSError:  # not listening yet
        return False


@pytest.fixture
def flower(lab: Lab, tmp_path: Path) -> Iterator[Flower]:
    """`drover flower` with credentials in the environment, where `ps` does not show them,
    connected to Redis as the lab's flower user.

    The caller's own FLOWER_* variables are dropped: drover flower refuses them.
    """
    port = free_port()
    user, password = "operator", secrets.token_hex(16)
    state = control.LabState.load(LabLayout.from_env())
    assert state is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env["DROVER_FLOWER_AUTH"] = f"{user}:{password}"
    env["DROVER_REDIS_URL"] = state.url(FLOWER)
    fl = Flower(f"http://127.0.0.1:{port}", user, password, tmp_path / "flower.log")
    with fl.log.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "--config",
                lab.config,
                "flower",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    try:
        wait_for(lambda: proc.poll() is not None or _answers(fl), FLOWER_START_S, "Flower")
        assert proc.poll() is None, fl.log.read_text()
        yield fl
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def events_live(flower: Flower) -> bool:
    """Both workers alive in Flower's event state: its event receiver is consuming."""
    alive = flower.get("/api/workers?status=true")
    return all(alive.get(worker_node(h)) is True for h in HOSTS)


def phase_tasks(flower: Flower, job_id: str) -> dict[str, dict[str, Any]]:
    """The job's tasks in Flower, by task name (every phase task takes only the job id)."""
    tasks = flower.get("/api/tasks").values()
    return {t["name"]: t for t in tasks if job_id in str(t.get("args"))}


def all_phases_done(flower: Flower, job_id: str) -> bool:
    seen = phase_tasks(flower, job_id)
    names = [task_name(p) for p in PHASE_ORDER]
    return all(seen.get(n, {}).get("state") == "SUCCESS" for n in names)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a PNG must start with."""
    assert data[:8] == PNG_SIGNATURE, data[:8]
    assert data[12:16] == b"IHDR", data[12:16]
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_flower_shows_workers_host_queues_and_a_finished_migration(
    lab: Lab, flower: Flower, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert shutil.which("chromium"), "Debian's chromium is needed (make deps installs it)"
    lab.home("idle-1")
    # The API needs the password; the dashboard and API never show Redis's.
    assert flower.request("/api/workers", auth=False)[0] == HTTP_UNAUTHORIZED
    wait_for(lambda: events_live(flower), EVENTS_LIVE_S, "both workers' events in Flower")

    workers = {w["hostname"]: w for w in flower.get("/workers?json=1")["data"]}
    for host in HOSTS:
        assert workers[worker_node(host)]["status"] is True, workers

    job = lab.migrate("idle-1", "lab1", "lab2")
    try:
        assert job.state.value == "succeeded", job.reason
        wait_for(lambda: all_phases_done(flower, job.id), TASKS_SEEN_S, "the job's tasks")
        tasks = phase_tasks(flower, job.id)
        for phase in PHASE_ORDER:
            task = tasks[task_name(phase)]
            host = "lab1" if PHASE_SIDE[phase] is Side.SOURCE else "lab2"
            assert job.id in task["args"], task
            assert (task["state"], task["worker"], task["routing_key"]) == (
                "SUCCESS",
                worker_node(host),
                host_queue(host),
            ), task
            # Flower sets `started` only from a task-started event, which the threads pool
            # lost before Celery 5.7 (celery/celery#10434, tests/unit/test_task_events.py);
            # without it a running phase shows RECEIVED, never STARTED.
            assert isinstance(task["started"], float), (phase, task)
            assert task["received"] <= task["started"] <= task["succeeded"], (phase, task)
        perform = tasks[task_name(Phase.PERFORM)]
        assert perform["runtime"] > 0, perform

        lengths = flower.get("/api/queues/length")["active_queues"]
        assert {q["name"] for q in lengths} >= {host_queue(h) for h in HOSTS}, lengths
        assert all(q["messages"] == 0 for q in lengths), lengths

        # Read-only by default: a control request is refused (and workers would not obey it).
        status, _ = flower.request(
            f"/api/worker/queue/add-consumer/{worker_node('lab1')}?queue={HARMLESS_QUEUE}",
            method="POST",
        )
        assert status == HTTP_FORBIDDEN

        profile = tmp_path / "chromium"
        dom = chromium(
            f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
            "--dump-dom",
            flower.browser_url("/"),
            profile=profile,
        ).stdout
        for host in HOSTS:
            assert worker_node(host) in dom, dom[:2000]

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.unlink(missing_ok=True)
        chromium(f"--screenshot={SCREENSHOT}", flower.browser_url("/"), profile=profile)
        data = SCREENSHOT.read_bytes()
        assert png_size(data) == WINDOW
        assert len(data) >= MIN_SCREENSHOT_BYTES, len(data)

        state = control.LabState.load(LabLayout.from_env())
        assert state is not None
        passwords = [urlsplit(state.url(role)).password or "" for role in ROLES]
        assert all(len(p) >= 16 for p in passwords)
        seen = [dom, flower.log.read_text(), json.dumps(workers)]
        seen += [flower.request(p)[1] for p in ("/broker", "/tasks", "/api/tasks", "/metrics")]
        assert not any(p in text for p in passwords for text in seen)
    finally:
        lab.home("idle-1")
    with capsys.disabled():
        print(f"\nscreenshot: {SCREENSHOT}")
