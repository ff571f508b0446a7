"""The lab's workers' exporters listen on each lab host's own address (a namespace's loopback
is out of reach from the root namespace), and the lab names them as scrape targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import load_settings
from lab import control
from lab.layout import LAB_DIR_ENV, LAB_ID_ENV, LabLayout
from lab.metrics import LAB_METRICS_PORT, metrics_targets
from lab.proc import LabError

LAB_ID = 9
URL = "redis://drover-producer:producer-0123456789abcdef@10.213.9.254:6397/0"


def test_each_lab_host_exports_on_its_own_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LAB_DIR_ENV, str(tmp_path / "lab"))
    monkeypatch.setenv(LAB_ID_ENV, str(LAB_ID))
    lab = LabLayout.from_env()
    with pytest.raises(LabError, match="no lab is up"):
        metrics_targets()

    control.make_lab_dir(lab)
    layouts = lab.hosts(3)
    path = control.write_config(lab, layouts, URL, tls=False)
    state = control.LabState(lab_id=LAB_ID, config=str(path), redis_url=URL)
    for h in layouts:
        state.hosts[h.name] = control.HostState(
            name=h.name, address=h.address, netns=h.netns, operator_uri="", peer_uri=""
        )
    state.save(lab)

    hosts = load_settings(path).hosts
    assert {name: hosts[name].metrics_address for name in hosts} == {
        h.name: h.address for h in layouts
    }
    assert metrics_targets() == {h.name: f"{h.address}:{LAB_METRICS_PORT}" for h in layouts}
