"""The operator's path from the issue, through the real `drover` CLI and virsh."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.lab_fixtures import Lab

pytestmark = pytest.mark.lab


def run(lab: Lab, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DROVER_CONFIG": lab.config}
    return subprocess.run(
        list(args), capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def drover(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return run(lab, sys.executable, "-m", "cli", *args)


def virsh_state(lab: Lab, host: str, domain: str) -> str:
    result = run(lab, "virsh", "-c", lab.uri(host), "domstate", domain)
    return result.stdout.strip() if result.returncode == 0 else "undefined"


def test_migrate_wait_then_virsh_shows_where_it_runs(lab: Lab) -> None:
    lab.home("idle-1")
    result = drover(
        lab, "migrate", "idle-1", "--from", "lab1", "--to", "lab2", "--live", "--p2p", "--wait"
    )
    assert result.returncode == 0, result.stderr
    assert "state=succeeded" in result.stdout
    assert virsh_state(lab, "lab2", "idle-1") == "running"
    assert virsh_state(lab, "lab1", "idle-1") == "shut off"

    job_id = result.stdout.splitlines()[0].split()[-1]
    events = [
        json.loads(line) for line in drover(lab, "events", job_id, "--json").stdout.splitlines()
    ]
    phases = {ev["phase"] for ev in events if ev["event"] == "phase.finished"}
    assert phases == {"source_preflight", "destination_prepare", "perform", "finish", "confirm"}


def test_migrate_json_returns_at_once_and_jobs_lists_it(lab: Lab) -> None:
    lab.home("idle-1")
    result = drover(lab, "migrate", "idle-1", "--from", "lab1", "--to", "lab2", "--live", "--json")
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["job_id"]

    followed = drover(lab, "events", job_id, "--follow", "--json")
    assert followed.returncode == 0, followed.stderr
    last = json.loads(followed.stdout.splitlines()[-1])
    assert (last["event"], last["state"]) == ("job.state", "succeeded")

    listed = json.loads(drover(lab, "jobs", "--json").stdout)
    mine = next(j for j in listed if j["id"] == job_id)
    assert (mine["state"], mine["domain"], mine["src"], mine["dst"]) == (
        "succeeded",
        "idle-1",
        "lab1",
        "lab2",
    )
    assert mine["duration_s"] > 0
    assert virsh_state(lab, "lab2", "idle-1") == "running"


def test_failed_migration_exits_non_zero_with_the_reason(lab: Lab) -> None:
    result = drover(lab, "migrate", "ghost", "--from", "lab1", "--to", "lab2", "--live", "--wait")
    assert result.returncode == 1
    assert result.stderr.strip().endswith("failed: ghost is not defined on lab1")


def test_lab_status_and_env_for_operators(lab: Lab) -> None:
    status = json.loads(drover(lab, "lab", "status", "--json").stdout)
    assert status["up"] is True
    for host in ("lab1", "lab2"):
        entry = status["hosts"][host]
        assert entry["worker_alive"] and entry["operator_uri"].startswith("qemu+unix:///system")
        assert run(lab, "virsh", "-c", entry["operator_uri"], "uri").returncode == 0
    env = drover(lab, "lab", "env")
    assert env.stdout.strip() == f"export DROVER_CONFIG={lab.config}"


def test_workers_answer_no_remote_control_and_show_alive_in_hosts(lab: Lab) -> None:
    """Remote control is off on workers (docs/security.md), and the producer's Redis user may
    not even send it (docs/redis-acl.md): `celery inspect` gets no answer; `drover hosts`
    (drover's own heartbeat) shows every worker alive."""
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    result = run(lab, celery, "-A", "config", "inspect", "ping", "--json", "--timeout", "2")
    assert result.returncode != 0
    assert "drover@" not in result.stdout
    hosts = json.loads(drover(lab, "hosts", "--json").stdout)
    alive = {h["host"]: h["worker_alive"] for h in hosts}
    assert alive == {h: True for h in lab.hosts()}, hosts
    # Each worker's report names its hypervisor's host-model CPU (the lab's guests run on qemu).
    assert all("qemu: " in (h["cpu"] or "") for h in hosts), hosts
