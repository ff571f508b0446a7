"""The ledger keeps every write through the worker's own crash (kill -9), unsynced.

Its commits are not fsynced (worker/ledger.py says why): what this costs is only the host's
own crash. What it must not cost is a write lost with the worker: a claim forgotten would let
a replayed phase run twice here. A real child process writes and is killed with SIGKILL,
its connection never closed; a fresh open must see every write.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from worker.ledger import Ledger, PhaseMark

JOB, PHASE, UUID, IMAGE = "aaaaaaaaaaaa", "perform", "6f1c2a9e-0000-4000-8000-000000000001", "/x"
WRITES_THEN_WAIT = f"""
import sys, time
from worker.ledger import Ledger, PhaseMark
ledger = Ledger(sys.argv[1])
assert ledger.claim({JOB!r}, {PHASE!r})
ledger.mark({JOB!r}, {PHASE!r}, PhaseMark.STARTED)
assert ledger.take_incoming({UUID!r}, {JOB!r}, lambda _job: False) is None
ledger.record_image({JOB!r}, {IMAGE!r})
print("written", flush=True)
time.sleep(600)
"""
DEADLINE_S = 30.0


def test_every_write_survives_the_worker_killed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", WRITES_THEN_WAIT, str(state)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], DEADLINE_S)
        assert ready, f"the child wrote nothing within {DEADLINE_S}s"
        line = child.stdout.readline()
        assert line.strip() == "written", line
        child.send_signal(signal.SIGKILL)
        assert child.wait(DEADLINE_S) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    ledger = Ledger(str(state))
    assert not ledger.claim(JOB, PHASE)  # claimed already: a replay is refused here
    assert ledger.marked(JOB, PHASE, PhaseMark.STARTED)
    assert ledger.incoming_job(UUID) == JOB
    assert ledger.images(JOB) == [IMAGE]
