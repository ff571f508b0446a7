"""Where `drover exporter` listens: its default address and port, and the parsed `--listen`.

Apart from producer/exporter.py, which imports prometheus_client, Redis and the schedules'
store: `drover --help` and `drover exporter --help` read these defaults without loading any
of that.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 9640


@dataclass(frozen=True)
class Listen:
    address: str
    port: int

    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"
