"""The worker exporter's fixed figures: where it listens by default and its histogram buckets.

Kept in config, beside the registry that says where each host's exporter listens
(config/settings_model.py `metrics_address` / `metrics_port`), so that no bound or default of
the metrics is written out in the worker's code. docs/metrics.md lists the series.
"""

from __future__ import annotations

# Loopback unless the registry says otherwise: the series name every domain on the host.
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
# Registry hosts' exporters; `drover exporter` (the fleet's) listens on 9640 by default.
DEFAULT_METRICS_PORT = 9641
# 0 as a host's metrics_port: no exporter on that host.
NO_EXPORTER = 0
# Every metric of drover starts so (Prometheus's convention: one prefix per exporter).
PREFIX = "drover_"

# Histogram buckets, seconds. A job: seconds for an idle guest, up to the migration timeout.
JOB_DURATION_BUCKETS_S = (2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# The guest's pause at switch-over: libvirt's default allowed downtime is 300 ms.
DOWNTIME_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)
# One phase: preflight and confirm take milliseconds, perform the whole transfer.
PHASE_DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
# Phases whose start the exporter remembers to time a failed one (its event has no duration):
# past this many open at once the oldest are forgotten (a phase whose end was never seen).
MAX_OPEN_PHASES = 1024
