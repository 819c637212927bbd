"""`chatzeo.watch` and `chatzeo.awatch`: across processes, over ZEO and FileStorage,
with clean cancellation and their own, released, connection."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import transaction
import ZODB
from ZODB.Connection import Connection
from ZODB.FileStorage import FileStorage

import chatzeo
from chatzeo import ChatSession, NoSuchRoom, get_root, open_db
from chatzeo.testing import ServerProcess, chatzeo_command, wait_until


def _feeds(db: ZODB.DB) -> list[chatzeo.ChangeFeed]:
    """The ChangeFeeds registered with the database's MVCC adapter right now."""
    return [i for i in db._mvcc_storage._instances if isinstance(i, chatzeo.ChangeFeed)]


def _open_connections(db: ZODB.DB) -> int:
    return sum(1 for c in db.pool.all if c.opened is not None)


@pytest.fixture
def file_db(tmp_path: Path) -> Iterator[ZODB.DB]:
    database = ZODB.DB(FileStorage(str(tmp_path / "app.fs")))
    manager = transaction.TransactionManager(explicit=True)
    connection = database.open(transaction_manager=manager)
    manager.begin()
    get_root(connection).room("lobby")
    manager.commit()
    connection.close()
    yield database
    database.close()


def _poster(db: ZODB.DB, room: str = "lobby") -> tuple[ChatSession, Connection]:
    """``room`` (created if needed) in a connection of its own, to post to with
    add_message (which commits through a private one)."""
    chatzeo.run_in_transaction(db, lambda c: get_root(c).room(room))
    manager = transaction.TransactionManager(explicit=True)
    connection = db.open(transaction_manager=manager)
    manager.begin()
    session = get_root(connection).rooms[room]
    manager.abort()
    return session, connection


def test_watch_on_filestorage_yields_each_commit_in_order_and_break_releases_it(file_db):
    session, connection = _poster(file_db)
    before = session.add_message("before the watch", "alice")
    got: list[str] = []
    watching = chatzeo.watch(file_db, session, after="now")
    assert len(_feeds(file_db)) == 1 and _open_connections(file_db) == 2

    def read() -> None:
        for message in watching:
            got.append(message.text)
            if len(got) == 3:
                break  # leaving the loop closes the watch, in this thread

    reader = threading.Thread(target=read)
    reader.start()
    for index in range(3):
        session.add_message(f"m{index}", "bob")
    reader.join(15)
    assert not reader.is_alive()
    assert got == ["m0", "m1", "m2"]
    assert watching.closed and _feeds(file_db) == [] and _open_connections(file_db) == 1

    # Resume from a key: exactly what came after it, from the start of history with 0.
    with chatzeo.watch(file_db, "lobby", after=before) as resumed:
        assert [m.text for m in resumed.poll(5)] == ["m0", "m1", "m2"]
        assert resumed.poll(0) == []
    with chatzeo.watch(file_db, "lobby", after=0, batch=2) as everything:
        assert [m.text for m in everything.poll(5)] == ["before the watch", "m0"]
        assert [m.text for m in everything.poll(5)] == ["m1", "m2"]
    assert _feeds(file_db) == [] and _open_connections(file_db) == 1
    connection.close()


def test_stop_from_another_thread_ends_a_waiting_iteration(file_db):
    watching = chatzeo.watch(file_db, "lobby")
    ended = threading.Event()

    def read() -> None:
        for _ in watching:
            pass
        ended.set()

    reader = threading.Thread(target=read)
    reader.start()
    watching.stop()
    assert ended.wait(10)
    reader.join(10)
    assert watching.closed and _feeds(file_db) == []


def test_a_missing_room_or_a_bad_start_is_refused_and_leaks_nothing(file_db):
    with pytest.raises(NoSuchRoom):
        chatzeo.watch(file_db, "no-such-room")
    with pytest.raises(TypeError):
        chatzeo.watch(file_db, "lobby", after="yesterday")  # type: ignore[arg-type]
    with pytest.raises(chatzeo.NotInDatabase):
        chatzeo.watch(file_db, chatzeo.ChatSession("unsaved"))
    assert _feeds(file_db) == [] and _open_connections(file_db) == 0


def test_watch_over_zeo_sees_a_send_from_another_process(server: ServerProcess, tmp_path):
    db = open_db(server.address)
    try:
        _session, connection = _poster(db)
        with chatzeo.watch(db, "lobby") as watching:
            sender = subprocess.run(
                chatzeo_command("send", "--server", server.address, "--room", "lobby",
                                "--name", "carol", "from another process"),
                capture_output=True, text=True, timeout=60,
            )
            assert sender.returncode == 0, sender.stderr
            got = wait_until("the sent message", lambda: watching.poll(1), timeout=20)
            assert [(m.author, m.text) for m in got] == [("carol", "from another process")]
        assert _feeds(db) == []
        connection.close()
    finally:
        db.close()


def test_watch_waits_out_a_server_crash_and_resumes(server: ServerProcess):
    db = open_db(server.address)
    try:
        session, connection = _poster(db)
        got: list[str] = []
        watching = chatzeo.watch(db, "lobby")
        def read() -> None:
            for message in watching:
                got.append(message.text)
                if len(got) == 2:
                    break

        reader = threading.Thread(target=read)
        reader.start()
        session.add_message("before the crash", "alice")
        wait_until("the first message", lambda: got, timeout=20)
        server.kill()
        server.start()
        session.add_message("after the restart", "alice", policy=chatzeo.RetryPolicy(60))
        reader.join(60)
        assert got == ["before the crash", "after the restart"]
        assert watching.closed
        connection.close()
    finally:
        db.close()


def test_awatch_yields_messages_and_cancelling_the_task_releases_it(file_db):
    session, connection = _poster(file_db)

    async def main() -> list[str]:
        got: list[str] = []
        arrived = asyncio.Event()
        watching = chatzeo.awatch(file_db, "lobby")

        async def consume() -> None:
            async for message in watching:
                got.append(message.text)
                if len(got) == 2:
                    arrived.set()

        task = asyncio.create_task(consume())
        # Post from a thread once the watch is open (it opens on first iteration).
        await asyncio.to_thread(wait_until, "the watch to open", lambda: _feeds(file_db))
        await asyncio.to_thread(session.add_message, "one", "alice")
        await asyncio.to_thread(session.add_message, "two", "alice")
        await asyncio.wait_for(arrived.wait(), 15)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(wait_until, "the watch to close", lambda: watching.closed)
        return got

    assert asyncio.run(main()) == ["one", "two"]
    assert _feeds(file_db) == [] and _open_connections(file_db) == 1
    connection.close()


def test_awatch_in_async_with_from_a_key_and_break(server: ServerProcess):
    db = open_db(server.address)
    try:
        session, connection = _poster(db)
        first = session.add_message("first", "alice")
        session.add_message("second", "alice")

        async def main() -> list[str]:
            got = []
            async with chatzeo.awatch(db, session, after=first) as watching:
                async for message in watching:
                    got.append(message.text)
                    break
            assert watching.closed
            return got

        assert asyncio.run(main()) == ["second"]
        assert _feeds(db) == []
        connection.close()
    finally:
        db.close()


def test_watch_across_processes_on_every_backend(backend):
    """ZEO pushes invalidations; RelStorage on PostgreSQL has chatzeo's NOTIFY trigger:
    a watch in this process sees a `chatzeo send` from another on both."""
    db = open_db(backend.target, wait=30)
    try:
        chatzeo.run_in_transaction(db, lambda c: get_root(c).room("lobby"))
        with chatzeo.watch(db, "lobby") as watching:
            sender = subprocess.run(
                chatzeo_command("send", "--server", backend.target, "--room", "lobby",
                                "--name", "dave", f"over {backend.kind}"),
                capture_output=True, text=True, timeout=60,
            )
            assert sender.returncode == 0, sender.stderr
            got = wait_until("the sent message", lambda: watching.poll(1), timeout=30)
            assert [m.text for m in got] == [f"over {backend.kind}"]
    finally:
        db.close()
