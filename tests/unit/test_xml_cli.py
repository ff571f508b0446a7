"""`drover migrate --xml FILE / --persistent-xml FILE` with files that cannot be used: one
line on stderr, a non-zero exit, nothing queued; and a good file is carried in the spec."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis

from config.addresses import shown
from jobs.domain_xml import MAX_DOMAIN_XML_CHARS
from jobs.store import job_key
from tests.conftest import RedisServer
from tests.support.cli import run_drover

MOVE = ["idle-1", "--from", "kvm1", "--to", "kvm2", "--live"]
UUID = "6f1c2a0e-8f3b-4d7e-9a55-0c1d2e3f4a5b"
MEM = Path("/proc/self/mem")  # exists, but read() fails (EIO), even for root
GOOD = f"<domain type='qemu'><name>idle-1</name><uuid>{UUID}</uuid></domain>"


def files(tmp_path: Path) -> dict[str, Path]:
    made = {
        "not-xml": tmp_path / "not.xml",
        "too-big": tmp_path / "big.xml",
        "binary": tmp_path / "bin.xml",
        "empty": tmp_path / "empty.xml",
        "renamed": tmp_path / "renamed.xml",
        "network": tmp_path / "net.xml",
    }
    made["not-xml"].write_text("name: idle-1\n")
    made["too-big"].write_text(GOOD.replace("</domain>", " " * MAX_DOMAIN_XML_CHARS + "</domain>"))
    made["binary"].write_bytes(b"\xff\xfe<domain/>")
    made["empty"].write_text("\n")
    made["renamed"].write_text(GOOD.replace("idle-1", "idle-9"))
    made["network"].write_text("<network><name>idle-1</name></network>")
    os.mkfifo(tmp_path / "fifo.xml")  # read, it would block the command forever
    (tmp_path / "link.xml").symlink_to(tmp_path / "fifo.xml")
    return made


CASES = [
    ("--xml", "missing", "--xml {path}: no such file"),
    ("--xml", "dir", "--xml {path}: is a directory"),
    ("--xml", "empty-path", "--xml: the path is empty"),
    ("--xml", "fifo", "--xml {path}: is a FIFO, not a regular file"),
    ("--xml", "fifo-link", "--xml {path}: is a FIFO, not a regular file"),
    ("--persistent-xml", "fifo", "--persistent-xml {path}: is a FIFO, not a regular"),
    ("--xml", "unreadable", "--xml {path}: cannot read it"),
    ("--xml", "not-xml", "--xml is not well-formed XML"),
    ("--xml", "too-big", "over 262144 characters"),
    ("--xml", "binary", "not UTF-8 text"),
    ("--xml", "empty", "the file is empty"),
    ("--xml", "renamed", "--xml names the guest 'idle-9'; it must be 'idle-1'"),
    ("--xml", "network", "the root element is <network>, not <domain>"),
    ("--persistent-xml", "renamed", "--persistent-xml names the guest 'idle-9'"),
]


@pytest.mark.parametrize(("option", "which", "message"), CASES)
def test_a_bad_file_is_one_line_and_queues_nothing(
    config: Path, redis_srv: RedisServer, tmp_path: Path, option: str, which: str, message: str
) -> None:
    made = files(tmp_path)
    special = {
        "missing": tmp_path / "missing.xml",
        "dir": tmp_path,
        "unreadable": MEM,
        "empty-path": "",
        "fifo": tmp_path / "fifo.xml",
        "fifo-link": tmp_path / "link.xml",
    }
    path = special[which] if which in special else made[which]
    extra = ["--persistent"] if option == "--persistent-xml" else []
    result = run_drover(config, "migrate", *MOVE, *extra, option, str(path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message.format(path=shown(str(path))) in lines[0]  # quoted as shown() quotes
    assert "Traceback" not in result.stderr + result.stdout
    assert not redis.Redis.from_url(redis_srv.url).keys("*")


def test_a_good_file_travels_in_the_spec(
    config: Path, redis_srv: RedisServer, tmp_path: Path
) -> None:
    good = tmp_path / "good.xml"
    good.write_text(GOOD)
    result = run_drover(config, "migrate", *MOVE, "--xml", str(good), "--json")
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["job_id"]
    r = redis.Redis.from_url(redis_srv.url, decode_responses=True)
    spec = json.loads(r.hget(job_key(job_id), "spec") or "{}")
    assert spec["dest_xml"] == GOOD
