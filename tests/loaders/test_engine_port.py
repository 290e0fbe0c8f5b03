"""Ports for the servers a gateway starts: picked where no connection takes them, and an engine whose
port was taken between its pick and its bind starts again on another one."""

from __future__ import annotations

import socket

import httpx

from loaders.engine import EngineProcess, EngineSpec, free_port


def test_a_taken_port_is_replaced(tmp_path):
    log = tmp_path / "engine.log"
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen()
    proc = EngineProcess(EngineSpec(model="m", served_name="m", log_path=log, mock_tokens_per_second=0))
    proc.port = taken.getsockname()[1]  # as if another process had bound the port this one picked
    try:
        proc.start()
        proc.wait_ready(timeout=60)
        assert proc.port != taken.getsockname()[1]
        assert httpx.get(proc.url + "/health").status_code == 200
        assert "address already in use" in log.read_text().lower()
    finally:
        proc.stop()
        taken.close()


def test_free_ports_are_below_the_ephemeral_range_and_never_repeat():
    """No outgoing connection can take a picked port before its server binds it (CI saw that)."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < low for p in ports)
    for port in ports[:20]:  # each one free to bind
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
