"""The poll loop in-process: health before and after polls, and what one poll exports."""

from __future__ import annotations

import threading
from pathlib import Path

import yaml

from vram_scheduler.monitor.readers import FileReader
from vram_scheduler.monitor.service import MonitorService, MonitorSettings

from .conftest import GIB, inventory_yaml


def service(tmp_path: Path, **settings) -> MonitorService:
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory_yaml()))
    reader = FileReader(path)
    return MonitorService(reader, MonitorSettings(node=reader.node, host="127.0.0.1", port=0, **settings))


def test_health_is_503_until_the_first_poll(tmp_path: Path) -> None:
    monitor = service(tmp_path)
    status, body = monitor.health()
    assert status == 503 and body["status"] == "stalled: no poll for ever" and body["polls"] == 0
    snapshot = monitor.poll_once()
    status, body = monitor.health()
    assert status == 200 and body["status"] == "ok" and body["polls"] == 1 and body["unhealthy_gpus"] == []
    assert [g.total_bytes for g in snapshot.inventory.gpus] == [80 * GIB, 24 * GIB]
    assert snapshot.last_success == snapshot.inventory.timestamp


def test_run_stops_on_request_and_closes_the_port(tmp_path: Path) -> None:
    import socket

    monitor = service(tmp_path, interval_s=0.05)
    port = monitor.start_http()
    thread = threading.Thread(target=monitor.run)
    thread.start()
    try:
        while monitor.polls < 3:
            thread.join(0.05)
    finally:
        monitor.stop()
        thread.join(10)
    assert not thread.is_alive()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the HTTP server is closed after run()"
