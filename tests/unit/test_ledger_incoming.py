"""Which job brings a domain in, as the destination's own ledger records it: a second job for
the same UUID is refused while the first lives, and only the recorded job may drop it."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.ledger import Ledger

UUID = "6f1c2a9e-0000-4000-8000-000000000001"
FIRST, SECOND = "aaaaaaaaaaaa", "bbbbbbbbbbbb"


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(str(tmp_path / "state"))


def not_ended(_job_id: str) -> bool:
    return False


def has_ended(_job_id: str) -> bool:
    return True


def test_a_second_job_is_refused_while_the_first_lives(ledger: Ledger) -> None:
    assert ledger.take_incoming(UUID, FIRST, not_ended) is None
    assert ledger.take_incoming(UUID, SECOND, not_ended) == FIRST
    assert ledger.incoming_job(UUID) == FIRST


def test_the_same_job_takes_it_again(ledger: Ledger) -> None:
    """A prepare re-run by recovery is the same job, not a second one."""
    assert ledger.take_incoming(UUID, FIRST, not_ended) is None
    assert ledger.take_incoming(UUID, FIRST, not_ended) is None


def test_an_ended_holder_is_taken_over(ledger: Ledger) -> None:
    assert ledger.take_incoming(UUID, FIRST, not_ended) is None
    assert ledger.take_incoming(UUID, SECOND, has_ended) is None
    assert ledger.incoming_job(UUID) == SECOND


def test_only_the_recorded_job_drops_it(ledger: Ledger) -> None:
    ledger.take_incoming(UUID, FIRST, not_ended)
    ledger.drop_incoming(UUID, SECOND)
    assert ledger.incoming_job(UUID) == FIRST
    ledger.drop_incoming(UUID, FIRST)
    assert ledger.incoming_job(UUID) is None


def test_the_record_outlives_the_worker(tmp_path: Path) -> None:
    Ledger(str(tmp_path / "state")).take_incoming(UUID, FIRST, not_ended)
    assert Ledger(str(tmp_path / "state")).incoming_job(UUID) == FIRST
