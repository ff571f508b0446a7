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


def test_established_reads_a_real_connection_as_ss_shows_it() -> None:
    """lab/faults.py reads `ss`'s columns by position: a connection made here must come back
    with its two ends the right way round."""
    import socket

    from lab.faults import established

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                mine = f"127.0.0.1:{client.getsockname()[1]}"
                ends = {(c.local, c.peer) for c in established("127.0.0.1")}
                assert (f"127.0.0.1:{port}", mine) in ends  # the server's side
                assert (mine, f"127.0.0.1:{port}") in ends  # the client's side
                server_side = [c for c in established() if c.peer == mine]
                assert [c.local_port for c in server_side] == [port]


def test_a_cache_rewrite_is_explained_by_its_validity_fields_or_its_first_changed_lines() -> None:
    """lab/cpu_faults.py: why libvirt wrote its cache over an edit, in the error it raises."""
    from lab.cpu_faults import _validity_change

    edited = "<qemuCaps>\n<selfctime>1</selfctime>\n<p name='aes' value='false'/>\n</qemuCaps>"
    probed = edited.replace("value='false'", "value='true'")
    assert _validity_change(edited, probed.replace(">1<", ">2<")) == "selfctime 1 -> 2"
    said = _validity_change(edited, probed)
    assert said.startswith("no validity field changed; 2 lines differ")
    assert "-<p name='aes' value='false'/>; +<p name='aes' value='true'/>" in said
