"""The lab's files keep their secrets to root: written into a temporary lab directory, no lab up.

state.json and drover.toml hold Redis passwords, the Redis config and ACL file sit beside the
data, and libvirtd's UNIX sockets take no credentials (`auth_unix_rw = "none"`): so the lab
directory, those files, the sockets and their directory are their owner's alone.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from config.settings import REDIS_URL_ENV, load_settings
from lab import control, libvirtd, redis_server, workers
from lab.layout import LabLayout

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
WORLD_READABLE_FILE = 0o644
WORLD_OPEN_DIR = 0o755
LAB_ID = 7
URL = "redis://drover-producer:producer-0123456789abcdef@10.213.7.254:6397/0"
WORKER_URL = "redis://drover-worker:worker-0123456789abcdef@10.213.7.254:6397/0"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def lab(tmp_path: Path) -> LabLayout:
    return LabLayout(lab_id=LAB_ID, dir=tmp_path / "lab")


def conf_values(text: str) -> dict[str, str]:
    """libvirtd.conf's `name = value` lines."""
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {name.strip(): value.strip() for name, value in pairs}


@pytest.mark.parametrize("tls", [False, True])
def test_libvirtd_sockets_admit_root_only(lab: LabLayout, tls: bool) -> None:
    values = conf_values(libvirtd.libvirtd_conf(lab, lab.host(1), tls))
    assert values["auth_unix_rw"] == '"none"'  # hence the permissions below
    for name in ("unix_sock_rw_perms", "unix_sock_ro_perms", "unix_sock_admin_perms"):
        assert values[name] == '"0700"', name


def test_host_files_put_the_sockets_in_a_directory_of_roots(lab: LabLayout) -> None:
    host = lab.host(1)
    run_dir = host.own_dir("/run/libvirt")
    run_dir.mkdir(parents=True)
    run_dir.chmod(WORLD_OPEN_DIR)  # as an earlier lab may have left it
    libvirtd.write_host_files(lab, host)
    assert mode(run_dir) == PRIVATE_DIR
    assert host.socket.parent == run_dir
    written = (host.own_dir("/etc/libvirt") / "libvirtd.conf").read_text()
    assert written == libvirtd.libvirtd_conf(lab, host)


def test_lab_dir_is_private_even_when_it_existed(lab: LabLayout) -> None:
    lab.dir.mkdir(parents=True)
    lab.dir.chmod(WORLD_OPEN_DIR)
    control.make_lab_dir(lab)
    assert mode(lab.dir) == PRIVATE_DIR


def test_state_holds_every_role_url_in_a_private_file(lab: LabLayout) -> None:
    control.make_lab_dir(lab)
    lab.state_path.write_text("{}")
    lab.state_path.chmod(WORLD_READABLE_FILE)  # a state file from before this change
    state = control.LabState(
        lab_id=LAB_ID,
        config=str(lab.config_path),
        redis_url=URL,
        role_urls={"producer": URL, "worker": WORKER_URL},
    )
    state.save(lab)
    assert mode(lab.state_path) == PRIVATE_FILE
    assert control.LabState.load(lab) == state
    assert state.url("worker") == WORKER_URL


def test_config_with_the_producer_password_is_private(lab: LabLayout) -> None:
    control.make_lab_dir(lab)
    path = control.write_config(lab, lab.hosts(2), URL, tls=False)
    assert mode(path) == PRIVATE_FILE
    assert load_settings(path).redis_url == URL


def test_worker_url_goes_through_the_environment_not_argv(lab: LabLayout) -> None:
    host = control.HostState(
        name="lab1", address="10.213.7.1", netns="drv7-lab1", operator_uri="", peer_uri=""
    )
    host.holder_pid = 4242
    argv = workers.worker_argv(host)
    assert not any("redis" in arg or "DROVER_" in arg for arg in argv), argv
    assert argv[-3:] == ["worker", "--host", "lab1"]
    env = workers.worker_env(lab.config_path, WORKER_URL)
    assert env[REDIS_URL_ENV] == WORKER_URL
    assert env["DROVER_CONFIG"] == str(lab.config_path)
    # nsenter leaves the worker in `/`: it finds this checkout's code through PYTHONPATH.
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(control.__file__).parents[1])


def test_redis_config_and_acl_are_private(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    conf = redis_server.write_conf(data, 6397, ["127.0.0.1"], ["aclfile /nonexistent"])
    assert mode(conf) == PRIVATE_FILE
    assert mode(data) == PRIVATE_DIR
    assert "aclfile /nonexistent" in conf.read_text().splitlines()
