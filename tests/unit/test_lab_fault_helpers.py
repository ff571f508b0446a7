"""The lab fault helpers' own parsing: which ports are the lab's Redis when a killed worker's
connections are waited out (lab/faults.py kill_worker)."""

from __future__ import annotations

from lab.faults import _redis_ports


def test_a_plain_redis_url_gives_its_port() -> None:
    assert _redis_ports("redis://producer:pw@10.213.9.254:6399/0", {}) == {6399}


def test_a_sentinel_set_gives_every_sentinel_and_every_node() -> None:
    url = (
        "sentinel://producer:pw@10.213.9.254:26401;sentinel://10.213.9.254:26402"
        "/0?master_name=drover"
    )
    assert _redis_ports(url, {"6401": 11, "6402": 12}) == {26401, 26402, 6401, 6402}
