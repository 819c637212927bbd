"""The room's invariants with a real shared database and several client processes.

Runs once per backend in tests/conftest.py (a `chatzeo serve` ZEO server, and any
other shared database chatzeo supports).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import transaction
from support import REPO, Backend, gather, stored

from chatzeo import ChatClient, get_root, open_db
from chatzeo.testing import wait_until

WORKERS = str(REPO / "tests" / "workers.py")


def _spawn(*args: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, WORKERS, *map(str, args)],
        stderr=subprocess.PIPE,
    )


def _finish(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        try:
            _, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert process.returncode == 0, err.decode()[-2000:]



def _run(
    backend: Backend, tmp_path: Path, offsets: list[float], per_writer: int, readers: int
) -> Any:
    """Writers with the given clock offsets and live readers, all at once."""
    room = "invariants"
    setup = ChatClient(open_db(backend.target))
    setup.join(room)
    setup.close()
    setup.db.close()
    expected = len(offsets) * per_writer
    reader_files = [tmp_path / f"reader{i}" for i in range(readers)]
    writer_files = [tmp_path / f"writer{i}" for i in range(len(offsets))]
    processes = [_spawn("reader", backend.target, room, expected, f) for f in reader_files]
    processes += [
        _spawn("writer", backend.target, room, per_writer, offset, f)
        for offset, f in zip(offsets, writer_files, strict=True)
    ]
    everyone = reader_files + writer_files
    wait_until(
        "every client ready",
        lambda: all((f.parent / f"{f.name}.ready").exists() for f in everyone),
        timeout=60,
    )
    (tmp_path / "START").touch()
    _finish(processes)
    returned = [f.read_text().split() for f in writer_files]
    seen = [f.read_text().split() for f in reader_files]
    return [record[0] for _, record in stored(backend.target, room)], returned, seen


def test_exactly_once_with_concurrent_writers(backend, tmp_path):
    stored, returned, _ = _run(backend, tmp_path, [0.0] * 4, per_writer=40, readers=0)
    sent = [message_id for ids in returned for message_id in ids]
    assert len(sent) == 160 == len(set(sent))
    assert len(stored) == 160 == len(set(stored))
    assert set(stored) == set(sent)
    # Each writer's messages keep that writer's order.
    for ids in returned:
        positions = [stored.index(message_id) for message_id in ids]
        assert positions == sorted(positions)


def test_one_order_and_no_miss_under_clock_skew(backend, tmp_path):
    # Writers disagree by up to 10 s, so commits arrive far out of timestamp order.
    stored, returned, seen = _run(backend, tmp_path, [-5.0, 0.0, 5.0], per_writer=30, readers=3)
    assert len(stored) == 90 == len(set(stored))
    assert set(stored) == {message_id for ids in returned for message_id in ids}
    for live in seen:
        assert live == stored


def test_cursor_and_embedding_across_processes(backend):
    db = open_db(backend.target)
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    root = connection.root()
    # A host application's own graph, with a chat room inside one of its objects.
    from persistent.mapping import PersistentMapping

    from chatzeo import ChatSession

    root["app"] = PersistentMapping({"ticket-42": PersistentMapping()})
    root["app"]["ticket-42"]["discussion"] = ChatSession("ticket-42")
    manager.commit()
    room = root["app"]["ticket-42"]["discussion"]
    writer = _spawn_embedded_writer(backend.target)
    try:
        def arrived() -> list[str]:
            manager.begin()
            connection.cacheMinimize()
            return [m.text for m in room.new_messages()]

        received: list[str] = []
        wait_until("five messages", gather(received, arrived, 5))
        assert received == [f"from another process {i}" for i in range(5)]
    finally:
        writer.wait(60)
        connection.close()
        db.close()
    assert writer.returncode == 0


def _spawn_embedded_writer(target: str) -> subprocess.Popen[bytes]:
    code = f"""
import transaction
from chatzeo import open_db
db = open_db({target!r})
connection = db.open()
room = connection.root()["app"]["ticket-42"]["discussion"]
for index in range(5):
    room.add_message(f"from another process {{index}}", "helper")
db.close()
"""
    return subprocess.Popen([sys.executable, "-c", code])


def test_racing_clients_create_a_room_once(backend, tmp_path):
    code = f"""
import sys, time
from pathlib import Path
from chatzeo import ChatClient, open_db
start = Path({str(tmp_path / "START")!r})
client = ChatClient(open_db({backend.target!r}), sys.argv[1])
Path({str(tmp_path)!r}, sys.argv[1]).touch()
while not start.exists():
    time.sleep(0.005)
client.join("race")
client.send("first post")
client.close()
client.db.close()
"""
    names = [f"racer{i}" for i in range(6)]
    racers = [subprocess.Popen([sys.executable, "-c", code, name]) for name in names]
    try:
        wait_until("racers ready", lambda: all((tmp_path / n).exists() for n in names), 60)
        (tmp_path / "START").touch()
        for racer in racers:
            assert racer.wait(120) == 0
    finally:
        for racer in racers:
            racer.kill()
    db = open_db(backend.target)
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    try:
        root = get_root(connection)
        assert list(root.rooms) == ["race"]
        messages = root.rooms["race"].history()
        assert sorted(m.author for m in messages) == names
        assert sorted(root.users) == names
    finally:
        connection.close()
        db.close()
