"""The shape of a progress sample that policies read (kept apart to avoid an import cycle)."""

from __future__ import annotations

from typing import Protocol


class ProgressLike(Protocol):
    @property
    def time_elapsed_ms(self) -> int: ...

    @property
    def data_remaining(self) -> int: ...

    @property
    def memory_iteration(self) -> int: ...
