"""Watched fan-out (chatzeo.server.fanout) against real `chatzeo serve` servers.

Every client here is its own ZEO connection over loopback (its own `open_db`), so the
server filters each as it would a separate process; the invariant suite
(tests/test_invariants.py) runs the same path with client processes. The dangerous
cases are each run twice where it helps: once as shipped, once with the client's
catch-up or cache reset switched off, to show the test sees the staleness it guards
against.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
import ZODB
from ZEO.ClientStorage import ClientStorage
from ZEO.StorageServer import StorageServer, ZEOStorage
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64

from chatzeo import ChatClient, open_db
from chatzeo.errors import TrustViolation
from chatzeo.server.fanout import FanoutMixin, WatchIndex, install_fanout
from chatzeo.testing import (
    ServerProcess,
    WireCounter,
    client_context,
    make_pki,
    openssl_missing,
    require,
    wait_until,
)
from chatzeo.zeoclient import NOTICE, FanoutClientStorage

pytestmark = pytest.mark.timeout(120)


class Heard:
    """Counts what the server pushes to one client's storage (on its IO thread)."""

    def __init__(self, db: Any) -> None:
        self.invalidations = 0
        self.notices = 0
        self.lock = threading.Lock()
        storage = db.storage
        io = storage._server.client
        forward_invalidation = storage.invalidateTransaction
        forward_info = io.info

        def invalidate(tid: bytes, oids: Any) -> None:
            with self.lock:
                self.invalidations += 1
            forward_invalidation(tid, oids)

        def info(values: dict[str, Any]) -> None:
            if NOTICE in values:
                with self.lock:
                    self.notices += 1
            forward_info(values)

        storage.invalidateTransaction = invalidate
        io.info = info


def _heard_of(db: Any, other: Any) -> None:
    """Wait until ``db``'s client has heard of ``other``'s last commit: by an
    invalidation at or after it, or by a notice that it missed commits (which
    covers every later one until it catches up). Right after a commit returns, the
    others are told a moment later, by stock ZEO as here."""
    tid = other.storage.lastTransaction()
    storage = db.storage

    def heard() -> bool:
        last = storage._cache.getLastTid()
        return bool(last >= tid or storage._fanout_notice > last)

    wait_until("the commit's news to arrive", heard)


def _drain(client: ChatClient, count: int, timeout: float = 20.0) -> list[str]:
    texts: list[str] = []
    deadline = time.monotonic() + timeout
    while len(texts) < count and time.monotonic() < deadline:
        if client.wait(0.5):
            texts.extend(message.text for message in client.receive())
    return texts


@pytest.fixture
def dbs(server: ServerProcess) -> Iterator[list[Any]]:
    opened: list[Any] = []
    yield opened
    for db in opened:
        db.close()


def _open(dbs: list[Any], address: str) -> Any:
    db = open_db(address)
    dbs.append(db)
    return db


def test_an_idle_client_hears_nothing_of_other_rooms(server: ServerProcess, dbs: list[Any]):
    writer = ChatClient(_open(dbs, server.address), "writer")
    writer.join("busy")
    reader = ChatClient(_open(dbs, server.address))
    reader.join("busy")
    idle_db = _open(dbs, server.address)
    idle = ChatClient(idle_db)
    idle.join("quiet")
    heard_idle = Heard(idle_db)
    # A stock ZEO client on the same server: the control, told of every commit.
    stock = ZODB.DB(ClientStorage(("127.0.0.1", server.port)))
    dbs.append(stock)
    heard_stock = Heard(stock)

    for index in range(40):
        writer.send(f"post {index}")
    assert _drain(reader, 40) == [f"post {index}" for index in range(40)]
    wait_until("the stock client heard all 40", lambda: heard_stock.invalidations >= 40)
    assert heard_idle.invalidations == 0
    assert heard_idle.notices <= 1  # one "you missed commits", not one per commit
    assert not idle.wait(0.2)  # its feed never fired
    for client in (writer, reader, idle):
        client.close()


def test_joining_a_room_never_loaded_sees_its_newest_post(server: ServerProcess, dbs: list[Any]):
    writer = ChatClient(_open(dbs, server.address), "writer")
    writer.join("elsewhere")
    joiner_db = _open(dbs, server.address)
    joiner = ChatClient(joiner_db)  # anonymous: joining commits nothing
    joiner.join("lobby")
    for index in range(5):
        writer.send(f"new {index}")
    _heard_of(joiner_db, writer.db)
    # The joiner heard nothing of those commits, but its join must see them.
    page = joiner.join("elsewhere")
    assert [m.text for m in page] == [f"new {index}" for index in range(5)]
    assert ("elsewhere", 5) in joiner.rooms()
    assert joiner_db.storage.fanout_syncs >= 1
    writer.close()
    joiner.close()


def test_without_the_catch_up_that_join_would_be_stale(
    server: ServerProcess, dbs: list[Any], monkeypatch: pytest.MonkeyPatch
):
    # The control for the test above: it shows the danger is real and that the
    # test would see it. (The room exists before, so the joiner's only way to learn
    # of the posts would be the catch-up.)
    writer = ChatClient(_open(dbs, server.address), "writer")
    writer.join("elsewhere")
    joiner_db = _open(dbs, server.address)
    joiner = ChatClient(joiner_db)
    joiner.join("lobby")
    monkeypatch.setattr(FanoutClientStorage, "_catch_up", lambda self, tid: tid)
    for index in range(5):
        writer.send(f"new {index}")
    _heard_of(joiner_db, writer.db)
    page = joiner.join("elsewhere")
    assert [m.text for m in page] == []  # stale: the room as it was at the join of lobby
    writer.close()
    joiner.close()


def test_a_room_read_before_stays_fresh(server: ServerProcess, dbs: list[Any]):
    writer = ChatClient(_open(dbs, server.address), "writer")
    writer.join("first")
    writer.send("one")
    reader_db = _open(dbs, server.address)
    reader = ChatClient(reader_db)
    assert [m.text for m in reader.join("first")] == ["one"]
    reader.join("second")  # still holds first's objects in its caches
    for index in range(3):
        writer.send(f"later {index}")
    _heard_of(reader_db, writer.db)
    page = reader.join("first")
    assert [m.text for m in page] == ["one", "later 0", "later 1", "later 2"]
    writer.close()
    reader.close()


@pytest.mark.parametrize("clear_cache", [True, False], ids=["as-shipped", "without-reset"])
def test_after_a_reconnection_posts_still_arrive(
    tmp_path: Path, clear_cache: bool, monkeypatch: pytest.MonkeyPatch
):
    if not clear_cache:
        # The control: keep the ZEO cache across the reconnection, as stock ZEO does.
        monkeypatch.setattr(FanoutClientStorage, "_forget_cache", lambda self: None)
    server = ServerProcess(tmp_path / "server").start()
    opened: list[Any] = []
    try:
        writer_db = open_db(server.address)
        reader_db = open_db(server.address)
        opened += [writer_db, reader_db]
        writer = ChatClient(writer_db, "writer")
        writer.join("room")
        reader = ChatClient(reader_db)
        reader.join("room")
        writer.send("before")
        assert _drain(reader, 1) == ["before"]

        server.kill()
        server.start()
        for db in (writer_db, reader_db):
            wait_until("reconnected", db.storage.is_connected, timeout=30)
        # The reconnection itself wakes the reader (its caches were invalidated).
        reader.wait(5)
        assert reader.receive() == []
        writer.send("after")
        received = _drain(reader, 1, timeout=3 if not clear_cache else 20)
        if clear_cache:
            assert received == ["after"]
        else:
            assert received == []  # the server never knew the reader held the clock
        writer.close()
        reader.close()
    finally:
        for db in opened:
            db.close()
        server.stop()


def test_with_the_commit_guard_on(tmp_path: Path):
    require("openssl", openssl_missing())
    pki = make_pki(tmp_path / "pki")
    guarded = ServerProcess(tmp_path / "data", pki=pki)
    guarded.start()
    opened: list[Any] = []
    try:
        alice_db = open_db(guarded.address, ssl=client_context(pki, "alice"))
        bob_db = open_db(guarded.address, ssl=client_context(pki, "bob"))
        idle_db = open_db(guarded.address, ssl=client_context(pki, "bob"))
        opened += [alice_db, bob_db, idle_db]
        alice = ChatClient(alice_db, "alice")
        alice.join("guarded")
        bob = ChatClient(bob_db)
        bob.join("guarded")
        idle = ChatClient(idle_db)
        idle.join("quiet")
        heard = Heard(idle_db)
        for index in range(10):
            alice.send(f"g{index}")
        assert _drain(bob, 10) == [f"g{index}" for index in range(10)]
        assert heard.invalidations == 0 and heard.notices <= 1
        assert [m.text for m in idle.join("guarded")][-1] == "g9"
        # The guard still checks commits under the composed handler.
        with pytest.raises(TrustViolation):
            ChatClient(bob_db, "alice")
        for client in (alice, bob, idle):
            client.close()
    finally:
        for db in opened:
            db.close()
        guarded.stop()


class InProcessServer:
    """A ZEO `StorageServer` in this process, with `install_fanout` and a small
    `MAX_WATCHED`, for what a subprocess server cannot show (its index)."""

    def __init__(self, path: Path, max_watched: int) -> None:
        self.server = StorageServer(("127.0.0.1", 0), {"1": FileStorage(str(path))})
        self.fanout = install_fanout(self.server, max_watched=max_watched)
        self.server.start_thread()
        host, port = self.server.acceptor.addr[:2]
        self.address = f"{host}:{port}"

    def close(self) -> None:
        self.server.close()


def _make_objects(db: Any, count: int) -> None:
    from persistent.mapping import PersistentMapping

    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    connection.root()["objects"] = [PersistentMapping(n=n) for n in range(count)]
    manager.commit()
    connection.close()


def _touch(db: Any, index: int) -> None:
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    connection.root()["objects"][index]["n"] += 1
    manager.commit()
    connection.close()


def test_a_client_watching_too_much_is_sent_everything(tmp_path: Path):
    # A hostile (or just huge) client cannot grow the server's index without bound:
    # past max_watched it is dropped from it and told of every commit instead.
    served = InProcessServer(tmp_path / "data.fs", max_watched=20)
    writer_db = open_db(served.address)
    greedy_db = open_db(served.address)
    try:
        _make_objects(writer_db, 30)
        _heard_of(greedy_db, writer_db)
        heard = Heard(greedy_db)
        _touch(writer_db, 29)  # greedy loaded nothing of it yet
        assert heard.invalidations == 0
        manager = transaction.TransactionManager()
        connection = greedy_db.open(transaction_manager=manager)
        manager.begin()
        assert sum(obj["n"] for obj in connection.root()["objects"][:25]) == sum(range(25))
        manager.abort()
        index = served.fanout.index("1")
        assert all(len(oids) <= 20 for oids in index.watching.values())
        before = heard.invalidations
        _touch(writer_db, 29)  # still not loaded by greedy, but it is over the limit
        wait_until("greedy told", lambda: heard.invalidations > before)
        connection.close()
    finally:
        writer_db.close()
        greedy_db.close()
        served.close()


def test_a_handler_without_the_mixin_is_told_everything(tmp_path: Path):
    # A create_client_handler set after install_fanout (say, by a later change to
    # serve) must not leave its clients deaf: Fanout notices them and broadcasts.
    served = InProcessServer(tmp_path / "data.fs", max_watched=1000)
    server = served.server
    server.create_client_handler = lambda: ZEOStorage(server, server.read_only)
    writer_db = open_db(served.address)
    plain_db = open_db(served.address)
    try:
        assert not isinstance(
            server.zeo_storages_by_storage_id["1"][0], FanoutMixin
        )
        _make_objects(writer_db, 3)
        heard = Heard(plain_db)
        _touch(writer_db, 2)
        wait_until("the plain handler's client told", lambda: heard.invalidations >= 1)
    finally:
        writer_db.close()
        plain_db.close()
        served.close()


def test_watch_index_forgets_a_connection_that_leaves():
    index = WatchIndex(max_watched=10)
    first, second = object(), object()
    for zs in (first, second):
        index.join(zs)
        index.opt_in(zs)
    index.watch(first, [b"a", b"b"])
    index.watch(second, [b"b"])
    assert index.watchers == {b"a": {first}, b"b": {first, second}}
    index.leave(first)
    assert index.watchers == {b"b": {second}}
    assert first not in index.current and first not in index.members


@pytest.mark.parametrize("named", [True, False], ids=["as-shipped", "without-naming"])
def test_an_old_revision_loaded_late_is_dropped_at_the_next_transaction(
    tmp_path: Path, named: bool, monkeypatch: pytest.MonkeyPatch
):
    # The reader's transaction started before the writer's commit, and only then
    # loads the object for the first time: it rightly gets the old revision, but
    # nothing told it of the commit (it held nothing then). Its next transaction
    # must not keep that revision. The control switches the server's naming off.
    served = InProcessServer(tmp_path / "data.fs", max_watched=1000)
    monkeypatch.setattr(served.fanout, "name_old_revisions", named)
    writer_db = open_db(served.address)
    reader_db = open_db(served.address)
    try:
        _make_objects(writer_db, 2)
        _heard_of(reader_db, writer_db)
        manager = transaction.TransactionManager()
        connection = reader_db.open(transaction_manager=manager)
        manager.begin()
        objects = connection.root()["objects"]  # the mappings are still ghosts
        _touch(writer_db, 1)
        wait_until("the reader noticed a commit", lambda: reader_db.storage._fanout_notice != z64)
        assert objects[1]["n"] == 1  # its snapshot is older than the commit: right
        manager.begin()
        assert objects[1]["n"] == (2 if named else 1)  # 1 would be a stale read
        manager.abort()
        connection.close()
    finally:
        writer_db.close()
        reader_db.close()
        served.close()


@pytest.mark.parametrize("push", [True, False], ids=["as-shipped", "without-push"])
def test_a_woken_reader_loads_nothing_from_the_server(
    server: ServerProcess, dbs: list[Any], push: bool, monkeypatch: pytest.MonkeyPatch
):
    # The room's clock comes with its invalidation (chatzeo_want), so delivering a
    # post costs the reader no request. The control asks for no push.
    if not push:
        monkeypatch.setattr(FanoutClientStorage, "fanout_want", lambda self, key, oids: None)
    writer = ChatClient(_open(dbs, server.address), "writer")
    writer.join("pushed")
    reader_db = _open(dbs, server.address)
    reader = ChatClient(reader_db)
    reader.join("pushed")
    wire = WireCounter(reader_db.storage)
    texts: list[str] = []
    for index in range(20):
        writer.send(f"p{index}")
        texts += _drain(reader, 1)  # one at a time: each post is its own delivery
    assert texts == [f"p{index}" for index in range(20)]
    if push:
        assert wire.requests == 0, wire.requests
    else:
        assert wire.requests >= 20  # the control: one load of the clock per post
    writer.close()
    reader.close()


def test_hostile_push_requests_are_bounded_or_ignored(tmp_path: Path):
    # Every chat user is a full ZEO client: what it may ask of chatzeo_want is
    # bounded (64 oids of 8 bytes) and nonsense is ignored, the connection working on.
    served = InProcessServer(tmp_path / "data.fs", max_watched=1000)
    db = open_db(served.address)
    try:
        call = db.storage._server.call
        index = served.fanout.index("1")
        call("chatzeo_want", "not a list")
        call("chatzeo_want", [b"short", 7, None])
        assert not index.wanted
        call("chatzeo_want", [n.to_bytes(8, "big") for n in range(10_000)])
        assert [len(oids) for oids in index.wanted.values()] == [64]
        tid = call("chatzeo_sync")
        assert tid == db.storage.lastTransaction()
        _make_objects(db, 2)  # the connection still commits
    finally:
        db.close()
        served.close()
