"""The lab workers' exporters: each on its host's own address, where the root namespace
(and a Prometheus run there, lab/prometheus.py) can reach it.

A namespace's loopback is its own, so the registry's default (127.0.0.1) would hide every
lab worker's exporter; the lab names each host's address instead, on the default port (each
host has an address of its own, so one port serves them all).
"""

from __future__ import annotations

from config.metrics import DEFAULT_METRICS_PORT
from config.settings import load_settings
from lab.state import loaded

LAB_METRICS_PORT = DEFAULT_METRICS_PORT


def metrics_lines(address: str) -> list[str]:
    """A lab host's `[hosts.NAME]` lines for its exporter (lab/control.py `write_config`)."""
    return [f'metrics_address = "{address}"', f"metrics_port = {LAB_METRICS_PORT}"]


def metrics_url(address: str) -> str:
    return f"http://{address}:{LAB_METRICS_PORT}/metrics"


def metrics_targets() -> dict[str, str]:
    """Each host of the lab that is up -> its exporter's `ADDR:PORT` (a Prometheus static
    target), as the lab's drover.toml says; LabError when no lab is up."""
    _, state = loaded()
    hosts = load_settings(state.config).hosts
    return {
        name: f"{hosts[name].metrics_address}:{hosts[name].metrics_port}"
        for name in state.hosts
        if hosts[name].metrics_port
    }
