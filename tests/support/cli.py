"""Running the `drover` CLI as a user would: a separate process, a given config file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CLI_TIMEOUT_S = 60


def run_drover(config: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    """`drover ARGS` with DROVER_CONFIG=config (and no Redis URL override from outside)."""
    env = {**os.environ, "DROVER_CONFIG": str(config)}
    env.pop("DROVER_REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
