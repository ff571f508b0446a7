"""`drover flower`: its refusals (one line, non-zero exit) and a real Flower behind them.

Each refusal comes before Flower would listen, so none of those runs a web server; a command
that started Flower instead would hit the subprocess timeout and fail the test. Then a real
`drover flower` on the test Redis: basic auth from the environment or a 0600 file and never
on any command line, 403 for a Host header that is not allowed (before authentication), and
HTTPS with client certificates when given a CA.
"""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPSConnection
from pathlib import Path

import pytest

from producer.cli_common import EXIT_FAILED, EXIT_USAGE
from producer.cli_flower import BASIC_AUTH_REFUSED
from tests.conftest import RedisServer, free_port
from tests.support.pki import LoopbackPki
from tests.support.process import terminate
from tests.support.registry import REGISTRY

FLOWER_TIMEOUT_S = 60
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 5.0
POLL_S = 0.1
SECRET = "s3cret-not-for-stderr"
USER = "operator"
BAD_AUTH = "basic auth (DROVER_FLOWER_AUTH or --auth-file) must be USER:PASSWORD[,USER:PASSWORD...]"
HTTP_OK, HTTP_UNAUTHORIZED, HTTP_FORBIDDEN = 200, 401, 403


def flower_env(config: Path, auth: str | None = None, **extra: str) -> dict[str, str]:
    """The caller's environment without FLOWER_* and DROVER_* variables, plus these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "DROVER_"))}
    env["DROVER_CONFIG"] = str(config)
    if auth is not None:
        env["DROVER_FLOWER_AUTH"] = auth
    return env | extra


def drover_flower(
    config: Path, *args: str, auth: str | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    """`drover flower ARGS` (on a free port) expected to refuse and exit."""
    return subprocess.run(
        [sys.executable, "-m", "cli", "flower", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        env=flower_env(config, auth, **extra),
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


def auth_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "flower-auth"
    path.write_text(text)
    path.chmod(mode)
    return path


# --- refusals ---------------------------------------------------------------------------------


def test_basic_auth_on_the_command_line_is_refused(config: Path) -> None:
    result = drover_flower(config, "--basic-auth", f"{USER}:{SECRET}")
    assert result.returncode == EXIT_USAGE
    assert one_line(result) == f"drover: {BASIC_AUTH_REFUSED}"
    assert SECRET not in result.stderr


@pytest.mark.parametrize(
    "variable", ["FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API", "FLOWER_ADDRESS"]
)
def test_flowers_own_variables_are_refused(config: Path, variable: str) -> None:
    """Flower would take them as options, over drover's checks."""
    result = drover_flower(config, **{variable: f"{USER}:{SECRET}"})
    assert result.returncode == EXIT_USAGE
    line = one_line(result)
    assert line.startswith(f"drover: {variable} is set: drover flower takes no Flower options")
    assert SECRET not in result.stderr


@pytest.mark.parametrize(
    "credentials",
    [
        "operator",  # no colon
        "operator:",  # no password
        f":{SECRET}",  # no user
        f"operator:{SECRET},guest",  # the second credential has no password
    ],
)
def test_malformed_basic_auth_is_refused(config: Path, tmp_path: Path, credentials: str) -> None:
    for result in (
        drover_flower(config, auth=credentials),
        drover_flower(config, "--auth-file", str(auth_file(tmp_path, credentials + "\n"))),
    ):
        assert result.returncode == EXIT_USAGE
        assert one_line(result) == f"drover: {BAD_AUTH}"
        assert SECRET not in result.stderr


def test_an_auth_file_others_can_read_is_refused(config: Path, tmp_path: Path) -> None:
    path = auth_file(tmp_path, f"{USER}:{SECRET}\n", mode=0o640)
    result = drover_flower(config, "--auth-file", str(path))
    assert result.returncode == EXIT_USAGE
    assert one_line(result) == (
        f"drover: --auth-file {path} is mode 0640; it holds passwords: chmod 600 {path}"
    )
    assert SECRET not in result.stderr


@pytest.mark.parametrize("which", ["fifo", "not-utf8", "empty-path"])
def test_an_auth_file_that_is_no_file_or_no_text_is_refused(
    config: Path, tmp_path: Path, which: str
) -> None:
    """A FIFO (reading it would block), bytes that are not UTF-8 (a traceback), an empty path
    (Path("") is ".": it read as a directory): one line naming the option and why."""
    fifo = tmp_path / "auth-fifo"
    os.mkfifo(fifo, 0o600)
    binary = tmp_path / "auth-binary"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    binary.chmod(0o600)
    path, message = {
        "fifo": (str(fifo), f"--auth-file {fifo}: is a FIFO, not a regular file"),
        "not-utf8": (str(binary), f"--auth-file {binary}: not UTF-8 text"),
        "empty-path": ("", "--auth-file: the path is empty"),
    }[which]
    result = drover_flower(config, "--auth-file", path)
    assert result.returncode == EXIT_USAGE
    assert one_line(result) == f"drover: {message}"


def test_credentials_from_two_places_are_refused(config: Path, tmp_path: Path) -> None:
    path = auth_file(tmp_path, f"{USER}:{SECRET}\n")
    result = drover_flower(config, "--auth-file", str(path), auth=f"{USER}:{SECRET}")
    assert result.returncode == EXIT_USAGE
    assert (
        one_line(result) == "drover: credentials from DROVER_FLOWER_AUTH and --auth-file: give one"
    )


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
    assert "DROVER_FLOWER_AUTH=USER:PASSWORD" in line and "--auth-file" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--allowed-host", "evil.example:80"], "--allowed-host 'evil.example:80' is not a host"),
        (["--allowed-host", "*"], "--allowed-host '*' is not a host name"),
        (["--certfile", "/etc/hostname"], "HTTPS needs both --certfile and --keyfile"),
        (["--ca-certs", "/etc/hostname"], "--ca-certs needs --certfile and --keyfile"),
        (
            ["--certfile", "/nonexistent/cert.pem", "--keyfile", "/etc/hostname"],
            "--certfile /nonexistent/cert.pem: no such file",
        ),
        (["--certfile", "/tmp", "--keyfile", "/etc/hostname"], "--certfile /tmp: is a directory"),
        (["--certfile", "", "--keyfile", "/etc/hostname"], "--certfile: the path is empty"),
    ],
)
def test_bad_host_and_tls_options_are_refused(config: Path, args: list[str], message: str) -> None:
    result = drover_flower(config, *args)
    assert result.returncode == EXIT_USAGE
    assert one_line(result).startswith(f"drover: {message}")


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "localhost"])
def test_loopback_needs_no_password_but_still_needs_redis(no_redis: Path, address: str) -> None:
    """Not refused for exposure: the next check, Redis, is what stops it here."""
    result = drover_flower(no_redis, "--address", address)
    assert result.returncode == EXIT_FAILED
    assert one_line(result).startswith("drover: cannot reach Redis at 127.0.0.1:")


def test_redis_unreachable_is_one_line_without_the_password(no_redis: Path) -> None:
    result = drover_flower(no_redis, "--address", "0.0.0.0", auth=f"ops:{SECRET}x")
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


# --- a real Flower ----------------------------------------------------------------------------


@dataclass
class RunningFlower:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def request(
        self, path: str, *, host: str | None = None, auth: bool = True, method: str = "GET"
    ) -> int:
        """The status of one plain-HTTP request, with this Host header (default: the one
        a browser at http://127.0.0.1:PORT sends)."""
        conn = HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT_S)
        headers = {"Host": host or f"127.0.0.1:{self.port}"}
        if auth:
            token = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        try:
            conn.request(method, path, body=b"" if method == "POST" else None, headers=headers)
            return conn.getresponse().status
        finally:
            conn.close()


def start_flower(config: Path, log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", "flower", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=flower_env(config, **env),
        )


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S).connect()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"Flower did not listen: {log.read_text()}") from None
            time.sleep(POLL_S)


def stop(proc: subprocess.Popen[bytes]) -> None:
    terminate(proc, STOP_TIMEOUT_S)


@pytest.fixture
def flower(config: Path, tmp_path: Path) -> Iterator[RunningFlower]:
    """`drover flower` with its credentials in a 0600 file, one extra allowed name."""
    port = free_port()
    path = auth_file(tmp_path, f"{USER}:{SECRET}\n")
    log = tmp_path / "flower.log"
    args = ["--port", str(port), "--auth-file", str(path), "--allowed-host", "flower.example"]
    proc = start_flower(config, log, *args)
    try:
        wait_listening(proc, port, log)
        yield RunningFlower(proc, port, log)
    finally:
        stop(proc)


def test_flower_answers_allowed_hosts_with_auth(flower: RunningFlower) -> None:
    for host in (
        None,
        f"localhost:{flower.port}",
        f"[::1]:{flower.port}",
        "LOCALHOST",
        "flower.example",
        f"flower.example:{flower.port}",
    ):
        assert flower.request("/api/workers?status=true", host=host) == HTTP_OK, host
    assert flower.request("/api/workers?status=true", auth=False) == HTTP_UNAUTHORIZED
    assert flower.request("/", auth=False) == HTTP_UNAUTHORIZED


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:5555",
        "127.0.0.1.evil.example",
        "flower.example.evil.example",
        "10.0.0.1",
    ],
)
def test_flower_refuses_any_other_host_before_auth(flower: RunningFlower, host: str) -> None:
    """DNS rebinding: a page elsewhere whose name now points at 127.0.0.1 gets 403."""
    for path in ("/", "/api/workers", "/api/tasks", "/static/css/flower.css", "/healthcheck"):
        assert flower.request(path, host=host) == HTTP_FORBIDDEN, path
        assert flower.request(path, host=host, auth=False) == HTTP_FORBIDDEN, path
    shutdown = "/api/worker/shutdown/drover@kvm1"
    assert flower.request(shutdown, host=host, method="POST") == HTTP_FORBIDDEN


def test_flower_credentials_are_on_no_command_line(flower: RunningFlower) -> None:
    """Not on `drover flower`'s, nor on any process it started."""
    assert flower.request("/api/workers?status=true") == HTTP_OK
    pids = [flower.proc.pid]
    children = Path(f"/proc/{flower.proc.pid}/task")
    for task in children.iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert SECRET not in cmdline, cmdline
    assert SECRET not in flower.log.read_text()


def test_flower_from_the_environment_counts_queues(config: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "flower.log"
    proc = start_flower(config, log, "--port", str(port), auth=f"{USER}:{SECRET}")
    try:
        wait_listening(proc, port, log)
        running = RunningFlower(proc, port, log)
        assert running.request("/api/queues/length") == HTTP_OK
        assert running.request("/api/queues/length", auth=False) == HTTP_UNAUTHORIZED
    finally:
        stop(proc)


def test_flower_serves_https_to_clients_with_a_certificate_of_the_ca(
    config: Path, tmp_path: Path
) -> None:
    pki = LoopbackPki.create(tmp_path / "pki")
    ca = pki.ca
    (server_key, server_cert), (client_key, client_cert) = (
        (p.key, p.cert) for p in (pki.issue("server"), pki.issue("client"))
    )
    port = free_port()
    log = tmp_path / "flower.log"
    args = ["--port", str(port), "--certfile", str(server_cert), "--keyfile", str(server_key)]
    proc = start_flower(config, log, *args, "--ca-certs", str(ca.cert), auth=f"{USER}:{SECRET}")
    try:
        wait_listening(proc, port, log)
        context = ssl.create_default_context(cafile=str(ca.cert))
        context.load_cert_chain(str(client_cert), str(client_key))
        conn = HTTPSConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S, context=context)
        conn.request("GET", "/healthcheck")
        assert conn.getresponse().status == HTTP_OK
        conn.close()
        anonymous = ssl.create_default_context(cafile=str(ca.cert))
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            conn = HTTPSConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S, context=anonymous)
            conn.request("GET", "/healthcheck")
            conn.getresponse()
        with pytest.raises(OSError):  # plain HTTP is not served at all
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=HTTP_TIMEOUT_S)
    finally:
        stop(proc)
    assert SECRET not in log.read_text()
