"""What the producer refuses at once, in one line: a follow of an id never seen while Redis is
away, a post-copy bandwidth for a migration whose policy forbids post-copy, and a typed value
of any length, quoted at most as config/addresses.py shown() quotes it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from config.addresses import MAX_SHOWN_CHARS
from config.policy_model import BUILTIN_POLICIES, EffectivePolicy
from jobs.keys import tune_key
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue
from tests.conftest import free_port
from tests.support.registry import REGISTRY
from tests.unit.test_hostile_inputs import run_cli

LONG = "x" * 10_000
CUT = " characters)"  # shown(): the value cut, and how long it was
# Longest line a refusal quoting LONG may be: the cut value and the words around it.
MAX_LINE = MAX_SHOWN_CHARS + 300
OUTAGE_S = 10


def drover(monkeypatch: pytest.MonkeyPatch, config: Path, *argv: str) -> tuple[int, str]:
    """`drover ARGV` in process: its exit code and stderr (stdout must stay empty)."""
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    code, out, err = run_cli(list(argv))
    assert out == "", out[:300]
    assert "Traceback" not in err, err[:2000]
    return code, err


def test_following_an_id_never_seen_while_redis_is_away_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing says a job goes on: one line naming Redis, not `wait_redis_outage` of waiting
    announced as "job ... goes on" (it may name no job at all)."""
    port = free_port()  # nothing listens there
    path = tmp_path / "drover.toml"
    path.write_text(
        REGISTRY.format(url=f"redis://:sekret@127.0.0.1:{port}/0")
        + f"\n[tunables]\nwait_redis_outage = {OUTAGE_S}\n"
    )
    started = time.monotonic()
    code, err = drover(monkeypatch, path, "events", "0123456789ab", "--follow")
    assert time.monotonic() - started < OUTAGE_S / 2
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"drover: cannot reach Redis at 127.0.0.1:{port}: ")
    assert "goes on" not in err and "sekret" not in err


def _migrating(store: JobStore, policy: str) -> str:
    spec = MigrationSpec(domain=f"guest-{policy}", src="kvm1", dst="kvm2")
    job_id = enqueue(store, spec, origin="t")
    for step in (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING):
        store.transition(job_id, step, host="kvm1")
    values = BUILTIN_POLICIES[policy]
    sources = {"allow_postcopy": f"policy {policy}"}
    store.update(job_id, policy=EffectivePolicy(name=policy, values=values, sources=sources))
    return job_id


def test_a_postcopy_bandwidth_is_refused_where_the_policy_forbids_post_copy(
    config: Path, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _migrating(store, "no-postcopy")
    code, err = drover(monkeypatch, config, "tune", job_id, "--postcopy-bandwidth", "50")
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"drover: --postcopy-bandwidth: job {job_id} runs with policy ")
    assert "no-postcopy, which does not allow post-copy (policy no-postcopy)" in err
    assert store.r.hlen(tune_key(job_id)) == 0  # nothing was put in line for the worker


def test_a_postcopy_bandwidth_still_goes_where_the_policy_allows_post_copy(
    config: Path, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    config.write_text(config.read_text() + "\n[tunables]\ncontrol_reply_timeout = 1\n")
    job_id = _migrating(store, "default")
    code, err = drover(monkeypatch, config, "tune", job_id, "--postcopy-bandwidth", "50")
    assert code == 1 and "no answer from kvm1's worker to tune" in err  # sent: no worker here
    assert store.r.hlen(tune_key(job_id)) == 1
    _, err = drover(monkeypatch, config, "tune", _migrating(store, "manual"), "--bandwidth", "5")
    assert "no answer from kvm1's worker to tune" in err  # a pre-copy figure: not refused


@pytest.mark.parametrize(
    "argv",
    [
        ["events", LONG],
        ["events", LONG, "--follow"],
        ["abort", LONG],
        ["postcopy", LONG],
        ["job", LONG],
        ["tune", LONG, "--bandwidth", "5"],
        ["force-complete", LONG],
        ["jobs", "--since", LONG],
        ["jobs", "--host", LONG],
        ["jobs", "--state", LONG],
        ["jobs", "--state", f"failed,{LONG}"],
        ["host", "disable", LONG],
        ["host", "enable", LONG],
        ["schedule", "add", "evacuate", "kvm1", "--cron", LONG],
        ["schedule", "add", "evacuate", "kvm1", "--at", LONG],
        ["schedule", "add", "evacuate", LONG, "--at", "2040-01-01T00:00:00Z"],
        ["schedule", "add", "evacuate", "kvm1", "--at", "2040-01-01T00:00:00Z", "--to", LONG],
        ["schedule", "add", "evacuate", "kvm1", "--cron", "0 3 * * *", "--to", f"{LONG},"],
        ["schedule", "remove", LONG],
        ["beat", "--loglevel", LONG],
    ],
    ids=lambda argv: " ".join(argv).replace(LONG, "LONG"),
)
def test_a_long_value_is_quoted_cut_short_in_one_line(
    argv: list[str], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, err = drover(monkeypatch, config, *argv)
    assert code == 2
    assert err.count("\n") == 1 and len(err) < MAX_LINE, err[:MAX_LINE]
    assert CUT in err, err[:MAX_LINE]
