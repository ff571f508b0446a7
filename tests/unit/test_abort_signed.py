"""The record's abort flag is acted on only as its asker signed it (jobs/abort_request.py,
worker/cancel_notice.py `flagged_abort`): with signing on, `HSET drover:job:J abort_requested
...` made J's source abort a migration no operator asked to stop. Real test Redis, real keys
(RSA), real SQLite ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from jobs.abort import ABORT_REASON, abort_job
from jobs.abort_request import genuine_abort, sign_abort
from jobs.evacuation import EvacuationSpec, EvacuationStore
from jobs.keys import ABORT_FIELD, ABORT_SIGNED_FIELD, POSTCOPY_FIELD, job_key
from jobs.request_signing import RequestSigner, signer_for
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue
from tests.conftest import RedisServer
from tests.support.registry import REGISTRY, signing_section
from tests.unit.test_request_signing import keys
from worker.cancel_notice import abort_asked, flagged_abort
from worker.evacuation_abort import SignedAbortEvacuations
from worker.ledger import Ledger
from worker.phase_errors import PhaseFailed
from worker.postcopy_switch import operator_switch
from worker.runtime import Runtime

__all__ = ["keys"]  # a fixture, used by name


@pytest.fixture
def rt(
    store: JobStore,
    redis_srv: RedisServer,
    keys: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Runtime:
    """kvm1's worker (the source) on a fleet with signing on; no hypervisor is reached."""
    config = tmp_path / "drover.toml"
    config.write_text(REGISTRY.format(url=redis_srv.url) + signing_section(keys))
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    return Runtime("kvm1", store, None, Ledger(str(tmp_path / "ledger")))  # type: ignore[arg-type]


def migrating(rt: Runtime, domain: str) -> str:
    """A signed job whose migration runs (as its record says)."""
    spec = MigrationSpec(domain=domain, src="kvm1", dst="kvm2", live=True)
    job_id = enqueue(rt.store, spec, origin="t", signer=signer_for(rt.settings.security))
    for state in (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING):
        assert rt.store.transition(job_id, state, host="kvm1")[0]
    return job_id


def operator_abort(rt: Runtime, job_id: str, signer: RequestSigner | None) -> str:
    """`drover abort` by a producer with `signer`'s key; its notice lost (the source's worker
    drains, or the broker is away): the flag alone tells the source."""
    return abort_job(rt.store, job_id, by="ops@site", rollback=lambda _j: None, signer=signer)


def test_the_operators_signed_abort_is_carried_out_from_the_flag(rt: Runtime) -> None:
    job_id = migrating(rt, "web01")
    line = operator_abort(rt, job_id, signer_for(rt.settings.security))
    assert line.startswith("abort requested: kvm1 aborts"), line
    assert abort_asked(rt, job_id) == ABORT_REASON
    assert flagged_abort(rt, rt.store, job_id) == ABORT_REASON


def test_a_flag_written_in_redis_is_passed_over_and_said_once(rt: Runtime) -> None:
    job_id = migrating(rt, "web02")
    rt.store.r.hset(job_key(job_id), ABORT_FIELD, ABORT_REASON)  # the attacker's write
    with capture_logs() as logs:
        assert abort_asked(rt, job_id) is None
        assert abort_asked(rt, job_id) is None  # the monitor's next look: not said again
    said = [e for e in logs if e["event"] == "security.rejected"]
    assert len(said) == 1, logs
    assert said[0]["job_id"] == job_id
    assert (
        "the record's abort flag is not acted on: the job carries no signed request"
        in (said[0]["reason"])
    )


def test_a_signed_abort_copied_onto_another_job_is_passed_over(rt: Runtime) -> None:
    asked, other = migrating(rt, "web03"), migrating(rt, "web04")
    operator_abort(rt, asked, signer_for(rt.settings.security))
    signed = rt.store.r.hget(job_key(asked), ABORT_SIGNED_FIELD)
    assert signed
    rt.store.r.hset(job_key(other), mapping={ABORT_FIELD: ABORT_REASON, ABORT_SIGNED_FIELD: signed})
    assert abort_asked(rt, other) is None
    assert abort_asked(rt, asked) == ABORT_REASON


def test_an_abort_signed_by_a_key_the_worker_does_not_trust_is_passed_over(
    rt: Runtime, keys: Path
) -> None:
    job_id = migrating(rt, "web05")
    stranger = RequestSigner(str(keys / "stranger-key.pem"), str(keys / "stranger.pem"))
    operator_abort(rt, job_id, stranger)
    assert rt.store.abort_requested(job_id) == ABORT_REASON
    assert abort_asked(rt, job_id) is None


def test_a_signed_abort_whose_reason_was_rewritten_is_passed_over(rt: Runtime) -> None:
    job_id = migrating(rt, "web06")
    operator_abort(rt, job_id, signer_for(rt.settings.security))
    rt.store.r.hset(job_key(job_id), ABORT_FIELD, "host on fire")
    assert abort_asked(rt, job_id) is None


def test_a_withdrawn_abort_takes_its_signature_with_it(rt: Runtime) -> None:
    job_id = migrating(rt, "web07")
    operator_abort(rt, job_id, signer_for(rt.settings.security))
    rt.store.withdraw_abort(job_id)
    assert rt.store.abort_request(job_id) == (None, None)
    assert abort_asked(rt, job_id) is None


def test_with_signing_off_any_flag_is_acted_on() -> None:
    assert genuine_abort(None, "0123456789ab", ABORT_REASON, None) == ABORT_REASON
    assert genuine_abort(None, "0123456789ab", None, None) is None


class NeverSwitched:
    """A domain whose post-copy switch must not be asked for."""

    def migrateStartPostCopy(self) -> None:
        raise AssertionError("no switch past an abort flag")


@pytest.mark.parametrize("signed", [True, False], ids=["operator's", "written in redis"])
def test_no_postcopy_switch_is_made_past_an_abort_flag_and_each_says_what_it_is(
    rt: Runtime, signed: bool
) -> None:
    """`drover force-complete` / `postcopy` past a flag: refused either way (the mark and the
    flag are kept apart in one step), and the refusal says which flag it is."""
    job_id = migrating(rt, f"web-{signed}")
    if signed:
        operator_abort(rt, job_id, signer_for(rt.settings.security))
    else:
        rt.store.r.hset(job_key(job_id), ABORT_FIELD, ABORT_REASON)
    with pytest.raises(PhaseFailed) as refused:
        operator_switch(rt, rt.store.get(job_id), NeverSwitched(), "switching to post-copy")  # type: ignore[arg-type]
    said = str(refused.value)
    if signed:
        assert f"job {job_id} is being aborted ({ABORT_REASON})" in said, said
    else:
        assert "carries an abort flag no trusted key signed: not switching" in said, said
    assert rt.store.r.hget(job_key(job_id), POSTCOPY_FIELD) is None


def test_an_evacuations_abort_flag_counts_only_as_its_asker_signed_it(rt: Runtime) -> None:
    """`HSET drover:job:EV abort_requested ...` made the evacuation's worker cancel its
    children: a drain stopped that no operator asked to stop. Its worker reads an unsigned
    flag as no abort (said once); `drover evacuate --abort`'s own, signed, counts."""
    records = EvacuationStore(rt.store)
    forged, asked = (
        records.create(EvacuationSpec(host=host, to=["kvm2"]), "t") for host in ("kvm1", "kvm3")
    )
    store = SignedAbortEvacuations(rt)
    records.request_abort(forged, ABORT_REASON)  # the attacker's write
    with capture_logs() as logs:
        assert store.get(forged).abort_requested is None
        assert store.get(forged).abort_requested is None
    said = [e for e in logs if e["event"] == "security.rejected"]
    assert [e["job_id"] for e in said] == [forged], logs
    assert records.get(forged).abort_requested == ABORT_REASON  # the record's own word

    signer = signer_for(rt.settings.security)
    records.request_abort(asked, ABORT_REASON, sign_abort(signer, asked, ABORT_REASON, "ops"))
    assert store.get(asked).abort_requested == ABORT_REASON
    # The same signature on the other evacuation names another: passed over there.
    signed = rt.store.r.hget(job_key(asked), ABORT_SIGNED_FIELD)
    rt.store.r.hset(job_key(forged), ABORT_SIGNED_FIELD, str(signed))
    assert store.get(forged).abort_requested is None
