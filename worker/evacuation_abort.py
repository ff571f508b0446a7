"""An evacuation's abort, as this worker believes it: only as its asker signed it.

The evacuation record's abort flag made its host's worker cancel every queued child and
abort every running one, and anyone with the Redis password could set it: a drain before
maintenance stopped that no operator asked to stop. `drover evacuate --abort` signs the abort
(jobs/abort_request.py, kind `abort`, naming the evacuation and its reason); with signing on,
the evacuation's worker reads a flag no trusted key signed as no abort, and says so once
(`security.rejected`). With signing off, any flag counts, as before.
"""

from __future__ import annotations

from typing import cast

from jobs.abort_request import genuine_abort
from jobs.evacuation import Evacuation, EvacuationStore
from jobs.keys import ABORT_SIGNED_FIELD, job_key
from jobs.request_signing import RequestRefused, RequestVerifier, verifier_for
from worker.cancel_notice import passed_over
from worker.runtime import Runtime
from worker.said_once import SaidOnce

_said = SaidOnce()  # evacuations whose unsigned flag was said passed over


class SignedAbortEvacuations(EvacuationStore):
    """The evacuation store, reading an abort flag no trusted key signed as no abort: on
    every host, and said on the evacuation's own."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt.store)
        self.verifier: RequestVerifier | None = verifier_for(rt.settings.security)
        self.host = rt.host

    def get(self, evacuation_id: str) -> Evacuation:
        ev = super().get(evacuation_id)
        if ev.abort_requested is None or self.verifier is None:
            return ev
        signed = cast(str | None, self.r.hget(job_key(evacuation_id), ABORT_SIGNED_FIELD))
        try:
            genuine_abort(self.verifier, evacuation_id, ev.abort_requested, signed)
        except RequestRefused as exc:
            # Said by the evacuation's own host, whose worker would have acted on it (every
            # host's watch reads each active evacuation before it knows whose it is).
            if ev.spec.host == self.host:
                passed_over(_said, evacuation_id, exc)
            return ev.model_copy(update={"abort_requested": None})
        return ev
