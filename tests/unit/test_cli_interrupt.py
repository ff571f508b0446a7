"""Ctrl-C while `drover` follows a job or an evacuation (`migrate --wait`, `events --follow`,
`evacuate --wait`): it goes on, and the command says so in one stderr line (its id, how to
follow it again and how to stop it), exit 130; with `--json` stdout still names it, as one
JSON object. The same through `drover cli-server`.

Real processes and the real test Redis: the records never end (no worker runs), and the
command is interrupted once Redis shows it blocked reading the record's events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import redis

from jobs.evacuation import EvacuationStore
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue
from tests.unit.test_cli_server import DEADLINE_S, Server, server, until

__all__ = ["server"]  # the fixture, for the served runs

MIGRATE = ["migrate", "idle-1", "--from", "kvm1", "--to", "kvm2", "--live", "--wait"]
ALIVE_S = 600  # kvm1's worker heartbeat: an evacuation is planned by it (none runs here)


def goes_on(kind: str, record_id: str) -> str:
    return (
        f"drover: interrupted: {kind} {record_id} goes on (follow it: drover events "
        f"{record_id} --follow; stop it: drover abort {record_id})\n"
    )


def started(config: Path, args: list[str], served: Server | None) -> subprocess.Popen[str]:
    """`drover ARGS` as a user runs it: here (`python -m cli`), or handed to `served`."""
    if served is None:
        env = {k: v for k, v in os.environ.items() if k != "DROVER_REDIS_URL"}
        argv = [sys.executable, "-m", "cli", *args]
        env["DROVER_CONFIG"] = str(config)
    else:
        env, argv = served.env, [str(Path(sys.executable).parent / "drover"), *args]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def interrupted(proc: subprocess.Popen[str], r: redis.Redis) -> tuple[str, str]:
    """Ctrl-C once `proc` (or the served command it hands its line to) is blocked reading a
    stream in Redis, that is following; its stdout and stderr once it has ended."""

    def following() -> bool:
        assert proc.poll() is None, proc.communicate()
        clients = cast("list[dict[str, str]]", r.client_list())
        return any(c["cmd"] == "xread" and "b" in c["flags"] for c in clients)

    until("the command follows the record", following)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err
    return out, err


@pytest.fixture
def r(store: JobStore) -> redis.Redis:
    return store.r


@pytest.mark.parametrize("how", ["here", "served"])
def test_ctrl_c_during_migrate_wait_says_the_job_goes_on(
    config: Path, store: JobStore, r: redis.Redis, how: str, request: pytest.FixtureRequest
) -> None:
    served = request.getfixturevalue("server") if how == "served" else None
    out, err = interrupted(started(config, MIGRATE, served), r)
    job_id = out.splitlines()[0].removeprefix("job ")  # what it says first
    assert err == goes_on("job", job_id)
    assert store.get(job_id).state is JobState.QUEUED  # it goes on: nothing aborted it


@pytest.mark.parametrize("how", ["here", "served"])
def test_ctrl_c_during_migrate_wait_json_still_names_the_job(
    config: Path, store: JobStore, r: redis.Redis, how: str, request: pytest.FixtureRequest
) -> None:
    """It printed nothing at all: a script could not know which job was still migrating."""
    served = request.getfixturevalue("server") if how == "served" else None
    out, err = interrupted(started(config, [*MIGRATE, "--json"], served), r)
    (line,) = out.splitlines()
    said = json.loads(line)
    assert said == {"job_id": said["job_id"], "interrupted": True}
    assert err == goes_on("job", said["job_id"])
    assert store.get(said["job_id"]).state is JobState.QUEUED


@pytest.mark.parametrize("how", ["here", "served"])
@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_during_events_follow_says_the_job_goes_on(
    config: Path,
    store: JobStore,
    r: redis.Redis,
    how: str,
    as_json: bool,
    request: pytest.FixtureRequest,
) -> None:
    served = request.getfixturevalue("server") if how == "served" else None
    job_id = enqueue(store, MigrationSpec(domain="web-1", src="kvm1", dst="kvm2"), origin="t")
    args = ["events", job_id, "--follow", *(["--json"] if as_json else [])]
    out, err = interrupted(started(config, args, served), r)
    assert err == goes_on("job", job_id)
    if as_json:  # its events as they were, one JSON object a line: nothing else in between
        assert all(json.loads(line)["event"] for line in out.splitlines())
    assert store.get(job_id).state is JobState.QUEUED


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_during_evacuate_wait_says_the_evacuation_goes_on(
    config: Path, store: JobStore, r: redis.Redis, as_json: bool
) -> None:
    store.heartbeat("kvm1", ALIVE_S, "test@kvm1")
    args = ["evacuate", "kvm1", "--wait", *(["--json"] if as_json else [])]
    out, err = interrupted(started(config, args, None), r)
    if as_json:
        (line,) = out.splitlines()
        said = json.loads(line)
        assert said == {"job_id": said["job_id"], "interrupted": True}
        evacuation_id = said["job_id"]
    else:
        evacuation_id = out.splitlines()[0].removeprefix("evacuation ")
    assert err == goes_on("evacuation", evacuation_id)
    evacuation = EvacuationStore(store).get(evacuation_id)
    assert not evacuation.terminal
