"""Bad input at the CLI: one line on stderr, a non-zero exit, and nothing queued in Redis."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisServer, free_port
from tests.support.cli import CLI_TIMEOUT_S, run_drover
from tests.support.registry import REGISTRY

TIMED = ["idle-1", "--from", "kvm1", "--to", "kvm2", "--completion-timeout", "5"]


def drover(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_drover(config, *args)


def queued_anything(redis_srv: RedisServer) -> bool:
    return bool(redis.Redis.from_url(redis_srv.url).keys("*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["idle-1", "--from", "kvm1", "--to", "kvm9"],
            "unknown host 'kvm9' (known hosts: kvm1, kvm2)",
        ),
        (["idle-1", "--from", "nowhere", "--to", "kvm2"], "unknown host 'nowhere'"),
        (["idle-1", "--from", "kvm1", "--to", "kvm1"], "source and destination are the same host"),
        (["idle-1", "--from", "kvm1", "--from", "kvm2", "--to", "kvm2"], "--from is given twice"),
        (["idle-1", "--from", "kvm1", "--to", "kvm2", "--live"], "--live is given twice"),
        (["../etc/passwd", "--from", "kvm1", "--to", "kvm2"], "invalid domain '../etc/passwd'"),
        (["web 01", "--from", "kvm1", "--to", "kvm2"], "invalid domain 'web 01'"),
        (["idle-1", "--from", "kvm1", "--to", "kvm2", "--bandwidth", "0"], "--bandwidth 0: "),
        (
            ["idle-1", "--from", "kvm1", "--to", "kvm2", "--bandwidth", "lots"],
            "Invalid value for '--bandwidth'",
        ),
        (["idle-1", "--from", "kvm1", "--to", "kvm2", "--timeout", "9"], "only with --wait"),
        (
            ["idle-1", "--from", "kvm1", "--to", "kvm2", "--force"],
            "--force only goes with --undefine-source",
        ),
        (
            ["idle-1", "--from", "kvm1", "--to", "kvm2", "--force", "--dry-run"],
            "--force only goes with --undefine-source",
        ),
        (
            ["idle-1", "--from", "kvm1", "--to", "kvm2", "--completion-timeout", "0"],
            "--completion-timeout 0: ",
        ),
        (
            ["idle-1", "--from", "kvm1", "--to", "kvm2", "--timeout-action", "abort"],
            "--timeout-action needs --completion-timeout",
        ),
        (
            [*TIMED, "--timeout-action", "postcopy"],
            "--timeout-action postcopy needs --postcopy",
        ),
        (
            [*TIMED, "--timeout-action", "sideways"],
            "'suspend', 'postcopy' or 'abort'",
        ),
        (
            ["idle-1", "--from", "kvm1", "--to", "kvm2", "--wait", "--timeout", "-1"],
            "--timeout must be above 0 seconds, not -1",
        ),
        (
            ["idle-1", "--from", "kvm1", "--to", "kvm2", "--wait", "--timeout", "nan"],
            "--timeout must be a finite number of seconds, not nan",
        ),
        (
            ["idle-1", "--from", "kvm1", "--to", "kvm2", "--wait", "--timeout", "1e400"],
            "--timeout must be a finite number of seconds, not inf",
        ),
    ],
)
def test_bad_migrate_requests(
    config: Path, redis_srv: RedisServer, args: list[str], message: str
) -> None:
    result = drover(config, "migrate", *args, "--live")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not queued_anything(redis_srv)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs", "--limit", "5", "--limit", "2"], ": --limit is given twice: give it once"),
        (["--config", "a.toml", "--config", "b.toml", "jobs"], ": --config is given twice"),
        (["host", "disable", "kvm2", "--reason", "a", "--reason=b"], "--reason is given twice"),
    ],
)
def test_an_option_given_twice_is_refused_not_resolved_to_its_last_value(
    config: Path, args: list[str], message: str
) -> None:
    result = drover(config, *args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_an_option_meant_to_repeat_and_a_value_like_an_option_are_not_refused(
    config: Path,
) -> None:
    assert drover(config, "jobs", "--state", "failed", "--state", "queued").returncode == 0
    # "--limit" here is --since's value (refused as a time), not --since given again
    result = drover(config, "jobs", "--since", "--limit", "--limit", "3")
    assert "--since '--limit' is neither a duration" in result.stderr


def test_unknown_job(config: Path) -> None:
    result = drover(config, "events", "0123456789ab")
    assert result.returncode == 2
    assert result.stderr.strip() == "drover: no job '0123456789ab'"


def test_malformed_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[hosts.kvm1]\nmigration_address = 3\n")
    result = drover(bad, "jobs")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "hosts.kvm1" in result.stderr


def test_redis_unreachable_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url=f"redis://:sekret@127.0.0.1:{free_port()}/0"))
    result = drover(path, "migrate", "idle-1", "--from", "kvm1", "--to", "kvm2", "--live")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("drover: cannot reach Redis at 127.0.0.1:")
    assert "sekret" not in result.stderr


def test_wrong_redis_password_is_one_line(tmp_path: Path, redis_srv: RedisServer) -> None:
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url=f"redis://:wrong@127.0.0.1:{redis_srv.port}/0"))
    result = drover(path, "jobs")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "password" in result.stderr.lower() and "wrong" not in result.stderr


def test_the_job_commands_run_alone_as_they_run_among_all_the_others(config: Path) -> None:
    """`drover jobs` builds only producer/cli.py's commands (cli/main.py job_app): the same
    names, help and errors as in the whole app, and every other command still reachable."""
    from typer.main import get_command

    from cli import main as cli_main
    from producer.cli import COMMAND_NAMES

    alone = get_command(cli_main.job_app()).commands  # type: ignore[attr-defined]
    everything = get_command(cli_main.full_app()).commands  # type: ignore[attr-defined]
    assert set(alone) == COMMAND_NAMES
    assert set(everything) > COMMAND_NAMES
    for name in COMMAND_NAMES:
        one, other = alone[name], everything[name]
        assert one.help == other.help
        assert [p.opts for p in one.params] == [p.opts for p in other.params]
    assert cli_main.command_named(["--config", "x.toml", "jobs", "--state", "a"]) == "jobs"
    assert cli_main.command_named(["--config=x.toml", "lab", "up"]) == "lab"
    assert cli_main.command_named(["--configx", "jobs"]) is None  # the whole app refuses it
    assert cli_main.command_named(["--help"]) is None
    refused = drover(config, "--config", str(config), "jobs", "--bogus")
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith(
        "jobs: No such option: --bogus (Possible options: --host)"
    )
    listed = drover(config, "--help").stdout
    assert all(name in listed for name in ("evacuate", "schedule", "lab", "jobs"))


@pytest.mark.parametrize("which", ["directory", "binary", "empty"])
@pytest.mark.parametrize("how", ["env", "option"])
def test_a_config_path_that_cannot_be_read_is_one_line(
    tmp_path: Path, which: str, how: str
) -> None:
    """A directory, a file that is not UTF-8, an empty path: by $DROVER_CONFIG or --config,
    one line and exit 2 (an empty path used to be skipped for another config file)."""
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    path = {"directory": str(tmp_path), "binary": str(binary), "empty": ""}[which]
    if how == "env":
        result = run_drover(path, "jobs")
    else:
        result = drover(tmp_path / "unused.toml", "--config", path, "jobs")
    message = {
        "directory": f"drover: config file {tmp_path}: is a directory",
        "binary": f"drover: config file {binary}: not UTF-8 text",
        "empty": "drover: $DROVER_CONFIG is set but empty"
        if how == "env"
        else "drover: --config: the path is empty",
    }[which]
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_a_control_character_in_a_one_line_error_is_escaped_not_stripped(
    tmp_path: Path, config: Path
) -> None:
    """Stripped, `dead.toml\\n` read as `dead.toml` (a file that exists) and a host key
    `lab\\x00x` as `labx`: the error named the wrong thing. Escaped, it names the right one."""
    result = run_drover(f"{config}\n", "jobs")
    assert result.returncode == 2
    assert result.stderr == f"drover: config file {config}\\n: no such file\n"
    bad = tmp_path / "bad.toml"
    bad.write_text('[hosts."lab\\u0000x"]\nmigration_address = 3\n')
    result = drover(bad, "jobs")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "hosts.lab\\x00x.name" in result.stderr and "hosts.labx" not in result.stderr


def test_a_bad_worker_loglevel_is_one_line_before_anything_starts(
    tmp_path: Path, config: Path
) -> None:
    """A worker that may run unsigned: Celery used to refuse the level with a traceback once
    the worker had connected to its libvirtd (here none answers: it failed on that instead);
    now refused up front, before the settings or libvirt, as `drover beat` refuses it."""
    path = tmp_path / "worker.toml"
    path.write_text(config.read_text() + "[security]\ninsecure = true\n")
    result = drover(path, "worker", "--host", "kvm1", "--loglevel", "BOGUS")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "drover: --loglevel 'BOGUS': one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    ]


def with_streams_closed(config: Path, closed: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`drover ARGS` run by a shell with `closed` (its redirection, `>&-`...) applied."""
    env = {**os.environ, "DROVER_CONFIG": str(config)}
    env.pop("DROVER_REDIS_URL", None)
    line = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "cli", *args))
    return subprocess.run(
        ["bash", "-c", f"{line} {closed}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def test_a_closed_stdout_is_refused_before_anything_is_done(
    config: Path, redis_srv: RedisServer
) -> None:
    """Probe: `drover jobs --json >&-` printed a traceback, and a migrate would have queued a
    job whose id nobody could be told."""
    for args in (["jobs", "--json"], ["migrate", "idle-1", "--from", "kvm1", "--to", "kvm2"]):
        done = with_streams_closed(config, ">&-", *args)
        assert done.returncode == 1, done.stderr
        assert done.stderr == "drover: standard output is closed: nothing done\n"
    assert not queued_anything(redis_srv)


def test_a_closed_stderr_or_stdin_keeps_the_exit_code(config: Path) -> None:
    """Probe: with stderr closed, `drover job nonexist` exited 1 instead of 2."""
    assert with_streams_closed(config, "2>&-", "job", "nonexist").returncode == 2
    refused = with_streams_closed(config, "<&- 2>&-", "migrate", "idle-1", "--from", "kvm1")
    assert refused.returncode == 2
    listed = with_streams_closed(config, "<&-", "jobs", "--json")
    assert (listed.returncode, listed.stdout) == (0, "[]\n"), listed.stderr


def test_output_that_cannot_be_written_is_one_line_and_a_queued_job_is_named(
    config: Path, redis_srv: RedisServer
) -> None:
    """Probe: `drover migrate ... >/dev/full` printed a traceback, and the job it had queued
    was named nowhere; `drover jobs --json >/dev/full` printed one too."""
    listed = with_streams_closed(config, ">/dev/full", "jobs", "--json")
    assert listed.returncode == 1
    assert listed.stderr == "drover: cannot write the output: No space left on device\n"
    for n, as_json in enumerate(((), ("--json",))):
        args = ("migrate", f"web-{n}", "--from", "kvm1", "--to", "kvm2", "--live", *as_json)
        queued = with_streams_closed(config, ">/dev/full", *args)
        assert queued.returncode == 1 and "Traceback" not in queued.stderr, queued.stderr
        (line,) = queued.stderr.splitlines()
        job_id = line.removeprefix("drover: job ").split()[0]
        assert line.startswith(f"drover: job {job_id} was queued, but its id could not be")
        assert redis.Redis.from_url(redis_srv.url).exists(f"drover:job:{job_id}")
