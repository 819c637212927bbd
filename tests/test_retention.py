"""Retention: a room capped by count or age keeps exactly what it should, under concurrent
writers; `chatzeo pack` while clients write and read keeps every message that should stay."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import transaction
from support import stored

from chatzeo import ChatClient, ChatSession, get_root, open_db
from chatzeo.maintenance import check_file
from chatzeo.testing import ServerProcess, chatzeo_command, wait_until

WORKERS = Path(__file__).with_name("fault_workers.py")
pytestmark = pytest.mark.timeout(240)


def configure_room(address: str, room: str, **caps: float) -> None:
    db = open_db(address, wait=30)
    try:
        with db.transaction() as connection:
            session = get_root(connection).room(room)
            for name, value in caps.items():
                setattr(session, name, value)
    finally:
        db.close()



def run_writers(address: str, room: str, tmp_path: Path, writers: int, count: int) -> list[str]:
    outs = [tmp_path / f"{room}-{n}.ids" for n in range(writers)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKERS), "writer", address, room, f"w{n}", str(count), str(out)],
            stderr=subprocess.PIPE,
        )
        for n, out in enumerate(outs)
    ]
    try:
        for process in processes:
            _, err = process.communicate(timeout=180)
            assert process.returncode == 0, err.decode()[-2000:]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    ids = [line for out in outs for line in out.read_text().splitlines()]
    assert ids.count("done") == writers and not [i for i in ids if i.startswith("failed")]
    return [i for i in ids if i != "done"]


def wait_until_or_false(condition: Callable[[], bool], timeout: float) -> bool:
    try:
        wait_until("a condition", condition, timeout)
    except AssertionError:
        return False
    return True


@pytest.fixture
def memory_room() -> Iterator[tuple[object, ChatSession]]:
    db = open_db("memory://")
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    room = get_root(connection).room("capped")
    manager.commit()
    yield manager, room
    manager.abort()
    connection.close()
    db.close()


def test_max_age_drops_messages_older_than_the_cap(memory_room: tuple[object, ChatSession]) -> None:
    _manager, room = memory_room
    room.max_age = 10.0
    for at in (1000.0, 1005.0, 1009.0):
        room.post(f"at {at}", "alice", clock=lambda: at)  # noqa: B023 (called at once)
    assert [m.text for m in room.history()] == ["at 1000.0", "at 1005.0", "at 1009.0"]
    room.post("at 1012", "alice", clock=lambda: 1012.0)
    assert [m.text for m in room.history()] == ["at 1005.0", "at 1009.0", "at 1012"]
    room.post("much later", "alice", clock=lambda: 2000.0)
    assert [m.text for m in room.history()] == ["much later"] and len(room) == 1


def test_max_messages_and_max_age_together(memory_room: tuple[object, ChatSession]) -> None:
    _, room = memory_room
    room.max_messages = 3
    room.max_age = 100.0
    for at in range(10):
        room.post(f"m{at}", None, clock=lambda: 5000.0 + at)  # noqa: B023 (called at once)
    assert [m.text for m in room.history()] == ["m7", "m8", "m9"] and len(room) == 3
    room.post("late", None, clock=lambda: 5200.0)
    assert [m.text for m in room.history()] == ["late"] and len(room) == 1


def test_max_messages_under_concurrent_writers(server: ServerProcess, tmp_path: Path) -> None:
    configure_room(server.address, "capped", max_messages=25)
    acked = run_writers(server.address, "capped", tmp_path, writers=4, count=40)
    items = stored(server.address, "capped")
    assert len(items) == 25
    assert {record[0] for _, record in items} <= set(acked)
    # Packing drops the trimmed messages' old revisions, never the 25 that stay.
    packed = subprocess.run(
        chatzeo_command("pack", "--server", server.address), capture_output=True, timeout=120
    )
    assert packed.returncode == 0, packed.stderr
    assert stored(server.address, "capped") == items


def test_max_age_under_concurrent_writers(server: ServerProcess, tmp_path: Path) -> None:
    configure_room(server.address, "aged", max_age=0.3)
    acked = run_writers(server.address, "aged", tmp_path, writers=3, count=40)
    items = stored(server.address, "aged")
    head = items[-1][0]
    assert all(key >= head - 300_000 for key, _ in items)
    assert items and {record[0] for _, record in items} <= set(acked)
    # However fast the writers were, once the newest message is older than max_age
    # the next post removes every one of them.
    wait_until("the newest message to age", lambda: time.time() * 1_000_000 > head + 300_000)
    client = ChatClient(open_db(server.address, wait=30))
    try:
        client.join("aged", history=0)
        sweeper = client.send("after the others aged")
    finally:
        client.close()
        client.db.close()
    assert [record[0] for _, record in stored(server.address, "aged")] == [sweeper.id]


def test_pack_while_clients_write_and_read(server: ServerProcess, tmp_path: Path) -> None:
    # Uncapped, so a reader that lags behind loses nothing (with a cap, a reader more
    # than the cap behind would miss the messages trimmed before it read them).
    configure_room(server.address, "packed")
    seed = subprocess.run(
        chatzeo_command("send", "--server", server.address, "--room", "packed", "seed"),
        capture_output=True, timeout=60,
    )
    assert seed.returncode == 0, seed.stderr
    tail_out = tmp_path / "tail.jsonl"
    with open(tail_out, "wb") as out:
        tail = subprocess.Popen(
            chatzeo_command("tail", "--server", server.address, "--room", "packed",
                            "--history", "1", "--json"),
            stdout=out, stderr=subprocess.PIPE,
        )
    try:
        wait_until("the tail to join", lambda: b"seed" in tail_out.read_bytes(), 60)
        outs = [tmp_path / f"packed-{n}.ids" for n in range(3)]
        writers = [
            subprocess.Popen(
                [sys.executable, str(WORKERS), "writer", server.address, "packed", f"w{n}",
                 "80", str(out)],
                stderr=subprocess.PIPE,
            )
            for n, out in enumerate(outs)
        ]
        packs = 0
        while any(w.poll() is None for w in writers) and packs < 6:
            packed = subprocess.run(
                chatzeo_command("pack", "--server", server.address), capture_output=True,
                timeout=120,
            )
            assert packed.returncode == 0, packed.stderr
            packs += 1
        for writer in writers:
            _, err = writer.communicate(timeout=180)
            assert writer.returncode == 0, err.decode()[-2000:]
        acked = [i for out in outs for i in out.read_text().splitlines() if i != "done"]
        assert len(acked) == 240

        def seen() -> list[str]:
            return [json.loads(line)["id"] for line in tail_out.read_text().splitlines()]

        if not wait_until_or_false(lambda: len(seen()) >= 241, 60):
            tail.terminate()
            _, err = tail.communicate(timeout=15)
            raise AssertionError(f"the tail saw {len(seen())} of 241: {err.decode()[-1500:]}")
    finally:
        tail.terminate()
        tail.communicate(timeout=15)  # reaps it and closes its stderr pipe
    ids = seen()[1:]
    assert sorted(ids) == sorted(acked)  # every message, once, to a reader across packs
    items = stored(server.address, "packed")
    assert items[0][1][2] == "seed" and [record[0] for _, record in items[1:]] == ids
    # One more message leaves old revisions of its bucket and clock for pack to drop.
    last = subprocess.run(
        chatzeo_command("send", "--server", server.address, "--room", "packed", "last"),
        capture_output=True, timeout=60,
    )
    assert last.returncode == 0, last.stderr
    items = stored(server.address, "packed")
    data_file = server.data_dir / "chat.fs"
    before = data_file.stat().st_size
    packed = subprocess.run(
        chatzeo_command("pack", "--server", server.address), capture_output=True, timeout=120
    )
    assert packed.returncode == 0, packed.stderr
    assert data_file.stat().st_size < before
    assert stored(server.address, "packed") == items
    server.stop()
    check_file(data_file)


def test_a_reader_further_behind_than_the_cap_skips_what_was_trimmed(
    memory_room: tuple[object, ChatSession],
) -> None:
    """The cap is a promise about storage, not delivery: a reader that lags more than
    ``max_messages`` behind gets only what is still stored, still in order."""
    _, room = memory_room
    room.max_messages = 3
    room.post("first", None)
    assert [m.text for m in room.new_messages()] == ["first"]
    for number in range(10):
        room.post(f"m{number}", None)
    assert [m.text for m in room.new_messages()] == ["m7", "m8", "m9"]
