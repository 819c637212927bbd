"""PostgreSQL-only behaviour: init-db, NOTIFY push, crashes of a writer and of the server.

Each test starts its own throwaway cluster (`chatzeo.testing.PostgresCluster`). Without PostgreSQL
they skip, or fail under ``CHATZEO_REQUIRE_POSTGRES=1``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
from support import REPO

from chatzeo import ChatClient, open_db
from chatzeo.errors import DatabaseNotPrepared
from chatzeo.initdb import init_db
from chatzeo.retry import RetryPolicy
from chatzeo.testing import PostgresCluster, chatzeo_command, postgres_missing, require, wait_until

WORKERS = str(REPO / "tests" / "workers.py")


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    require("postgres", postgres_missing())
    running = PostgresCluster().start()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def target(cluster: PostgresCluster) -> str:
    uri = cluster.create_database("chat")
    init_db(uri)
    return uri


def _dsn(storage: Any) -> str:
    """The PostgreSQL connection string of a RelStorage ``storage`` (it must have one)."""
    from chatzeo.postgres import dsn_of

    dsn = dsn_of(storage)
    assert dsn is not None, f"{storage!r} is not on PostgreSQL"
    return dsn


def _psql_one(cluster: PostgresCluster, sql: str) -> Any:
    import psycopg2

    connection = psycopg2.connect(cluster.dsn("chat"))
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone()[0]
    finally:
        connection.close()


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CHATZEO_DATA"] = str(tmp_path / "client-data")
    env.pop("CHATZEO_SERVER", None)
    return env


def test_init_db_twice_from_the_command_line(cluster, tmp_path):
    uri = cluster.create_database("chat")
    for _ in range(2):
        done = subprocess.run(
            chatzeo_command("init-db", uri), env=_env(tmp_path),
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "NOTIFY trigger" in done.stdout
    triggers = _psql_one(
        cluster, "SELECT count(*) FROM pg_trigger WHERE tgname='chatzeo_notify_each'"
    )
    assert triggers == 1
    # history-free: one row per object, no history tables.
    assert _psql_one(cluster, "SELECT to_regclass('current_object') IS NULL") is True


def test_a_database_without_init_db_is_refused_with_the_remedy(cluster):
    uri = cluster.create_database("chat")
    db = open_db(uri)
    try:
        with pytest.raises(DatabaseNotPrepared, match="chatzeo init-db"):
            ChatClient(db)
    finally:
        db.close()


def test_a_history_preserving_database_is_refused(cluster):
    uri = cluster.create_database("chat") + "?keep_history=true"
    with pytest.raises(DatabaseNotPrepared, match="history-free"):
        init_db(uri)


def test_notify_wakes_a_reader_of_that_room_only(target):
    reader_db, writer_db = open_db(target), open_db(target)
    reader = ChatClient(reader_db)
    writer = ChatClient(writer_db, "ann")
    try:
        reader.join("watched")
        writer.join("elsewhere")
        writer.send("not for the reader")
        writer.join("watched")
        # Joining writes the room's membership, not its clock; the post does.
        sent = writer.send("hello")
        wait_until("the NOTIFY to wake the reader", lambda: reader.wait(0.5))
        assert [m.id for m in reader.receive()] == [sent.id]
        # Posts elsewhere never fire this feed: the trigger carries each written oid.
        writer.join("elsewhere")
        writer.send("still not for the reader")
        assert reader.wait(0.5) is False
    finally:
        for client in (reader, writer):
            client.close()
            client.db.close()


def test_an_aborted_transaction_notifies_no_one(target):
    from persistent.mapping import PersistentMapping

    from chatzeo.postgres import Listener

    db = open_db(target)
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    root = connection.root()
    root["aborted"], root["committed"] = PersistentMapping(), PersistentMapping()
    manager.commit()
    aborted, committed = root["aborted"]._p_oid, root["committed"]._p_oid
    heard: list[frozenset[bytes] | None] = []
    lock = threading.Lock()

    def hear(oids: frozenset[bytes] | None) -> None:
        with lock:
            heard.append(oids)

    listener = Listener(_dsn(db.storage), hear)
    listener.subscribe(listener, frozenset({aborted, committed}))
    try:
        root["aborted"]["x"] = 1
        # Up to the vote the rows are written in PostgreSQL; then we abort.
        txn = manager.get()
        txn.savepoint()
        manager.abort()
        root["committed"]["x"] = 1
        manager.commit()

        def all_heard() -> set[bytes]:
            with lock:
                return {oid for batch in heard for oid in batch or ()}

        # Notifications come in commit order, so once the later commit is heard,
        # the aborted one would already have been.
        wait_until("the committed change", lambda: committed in all_heard())
        assert aborted not in all_heard()
        assert None not in heard
    finally:
        listener.close()
        connection.close()
        db.close()


def test_an_abort_after_vote_notifies_no_one(target):
    """Rows really reach object_state at the vote; aborting then must stay silent."""
    from chatzeo.postgres import Listener

    db = open_db(target)
    storage = db.storage
    heard: list[frozenset[bytes] | None] = []
    listener = Listener(_dsn(storage), heard.append)
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    try:
        root = connection.root()
        listener.subscribe(listener, frozenset({root._p_oid}))
        root["vote"] = 1
        txn = manager.get()
        # Drive two-phase commit by hand: begin, store, vote, then abort.
        connection.tpc_begin(txn)
        connection.commit(txn)
        connection.tpc_vote(txn)
        connection.tpc_abort(txn)
        manager.abort()
        root = connection.root()
        root["after"] = 1
        manager.commit()
        root_oid = root._p_oid
        wait_until("the later commit", lambda: any(b and root_oid in b for b in heard))
        # The root was written by both transactions; only the committed one told.
        assert sum(1 for b in heard if b and root_oid in b) == 1
    finally:
        listener.close()
        connection.close()
        db.close()


def test_send_and_tail_with_a_postgres_uri(target, tmp_path):
    env = _env(tmp_path)
    # Reading commands never create rooms: the first send makes it.
    first = subprocess.run(
        chatzeo_command("send", "--server", target, "--room", "cli", "--name", "bob", "first"),
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert first.returncode == 0, first.stderr
    tail = subprocess.Popen(
        chatzeo_command("tail", "--server", target, "--room", "cli", "--history", "1"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert tail.stdout is not None
        # The history line shows tail has joined, so the next send is new to it.
        assert tail.stdout.readline().rstrip().endswith("<bob> first")
        sent = subprocess.run(
            chatzeo_command("send", "--server", target, "--room", "cli", "--name", "bob", "hi"),
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        assert tail.stdout is not None
        line = tail.stdout.readline()
        assert line.rstrip().endswith("<bob> hi")
    finally:
        tail.send_signal(signal.SIGINT)
        tail.communicate(timeout=30)  # reaps it and closes its pipes


def test_a_writer_killed_mid_stream_loses_nothing_committed(target, tmp_path):
    room = "kill"
    setup = ChatClient(open_db(target))
    setup.join(room)
    setup.close()
    setup.db.close()
    out = tmp_path / "victim"
    (tmp_path / "START").touch()
    victim = subprocess.Popen(
        [sys.executable, WORKERS, "writer", target, room, "100000", "0", str(out)],
        stderr=subprocess.DEVNULL,
    )
    reader = ChatClient(open_db(target))
    try:
        reader.join(room, history=0)
        seen: list[str] = []

        def some_arrived() -> bool:
            if reader.wait(0.5):
                seen.extend(m.id for m in reader.receive())
            return len(seen) >= 20

        wait_until("the victim's first posts", some_arrived, timeout=60)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        survivor = ChatClient(open_db(target), "survivor")
        survivor.join(room, history=0)
        last = survivor.send("after the kill")
        survivor.close()
        survivor.db.close()

        def got_last() -> bool:
            if reader.wait(0.5):
                seen.extend(m.id for m in reader.receive())
            return last.id in seen

        wait_until("the survivor's post", got_last, timeout=60)
        reader._manager.begin()
        stored = [m.id for m in reader.room.history(limit=1_000_000)]  # type: ignore[union-attr]
        assert len(stored) == len(set(stored))
        assert stored[-1] == last.id
        assert [i for i in stored if i in set(seen)] == seen[: len(seen)]
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)
        reader.close()
        reader.db.close()


def test_postgres_restart_under_load_loses_and_repeats_nothing(cluster, target):
    room = "restart"
    writer = ChatClient(open_db(target), "writer", policy=RetryPolicy(max_seconds=60))
    reader = ChatClient(open_db(target))
    writer.join(room, history=0)
    reader.join(room, history=0)
    sent: list[str] = []
    failure: list[BaseException] = []
    stop = threading.Event()

    def write() -> None:
        try:
            while not stop.is_set() and len(sent) < 5000:
                sent.append(writer.send(f"message {len(sent)}").id)
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=write)
    thread.start()
    seen: list[str] = []

    def read_until(count: int) -> bool:
        if reader.wait(0.5):
            seen.extend(m.id for m in reader.receive())
        return len(seen) >= count or bool(failure)

    try:
        wait_until("posts before the crash", lambda: read_until(20), timeout=60)
        cluster.kill()
        cluster.start()
        before = len(sent)
        wait_until("posts after the restart", lambda: len(sent) >= before + 20 or failure, 90)
        stop.set()
        thread.join(90)
        assert not failure, failure
        wait_until("every post read", lambda: read_until(len(sent)) and set(sent) <= set(seen), 90)
    finally:
        stop.set()
        thread.join(90)
        writer.close()
        reader.close()
        writer.db.close()
        reader.db.close()
    assert len(seen) == len(set(seen))
    assert seen == sent


def test_serve_over_relstorage_warns_about_other_front_ends(cluster, target, tmp_path):
    from chatzeo.testing import ServerProcess

    config = tmp_path / "zeo-relstorage.conf"
    config.write_text(
        "%import relstorage\n%define DATA_DIR var\n"
        "<zeo>\n  address 127.0.0.1:1\n</zeo>\n"
        "<relstorage 1>\n  keep-history false\n"
        f"  <postgresql>\n    dsn {cluster.dsn('chat')}\n  </postgresql>\n"
        "</relstorage>\n"
    )
    server = ServerProcess(tmp_path / "front", config=config).start()
    try:
        client = ChatClient(open_db(server.address), "zed")
        client.join("front", history=0)
        client.send("through ZEO")
        client.close()
        client.db.close()
    finally:
        server.stop()
    log = server.log.read_text()
    assert "is a RelStorage database" in log
    assert "Run exactly one chatzeo serve per database" in log


def test_a_zconfig_file_with_relstorage_is_a_target(cluster, tmp_path):
    cluster.create_database("chat")
    config = tmp_path / "chat.conf"
    config.write_text(
        "%import relstorage\n<zodb>\n  <relstorage>\n    keep-history false\n"
        f"    <postgresql>\n      dsn {cluster.dsn('chat')}\n    </postgresql>\n"
        "  </relstorage>\n</zodb>\n"
    )
    assert any("NOTIFY trigger" in line for line in init_db(str(config)))
    reader = ChatClient(open_db(str(config)))
    writer = ChatClient(open_db(cluster.uri("chat")), "cy")
    try:
        reader.join("conf")
        writer.join("conf", history=0)
        sent = writer.send("through a config file")
        wait_until("the reader to be woken", lambda: reader.wait(0.5))
        assert [m.id for m in reader.receive()] == [sent.id]
    finally:
        for client in (reader, writer):
            client.close()
            client.db.close()


def _clients_of(cluster: PostgresCluster, application: str) -> int:
    return int(_psql_one(
        cluster, f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{application}'"
    ))


def test_one_listener_per_process_hears_only_its_rooms(cluster, target):
    # Three readers in this process, in two rooms, and a writer busy in a third:
    # one LISTEN connection serves all three feeds, and PostgreSQL sends it only the
    # notifications of the two watched clocks, not the writer's room.
    from chatzeo import postgres

    dbs = [open_db(target) for _ in range(4)]
    readers = [ChatClient(db) for db in dbs[:3]]
    writer = ChatClient(dbs[3], "wendy")
    try:
        readers[0].join("one")
        readers[1].join("one")
        readers[2].join("two")
        writer.join("busy")
        for reader in readers:
            reader.wait(1)  # the one look every join takes
        assert _clients_of(cluster, "chatzeo-listener") == 1
        listener = postgres.shared_listener(_dsn(dbs[0].storage))
        postgres.release_listener(listener)
        for index in range(20):
            writer.send(f"busy {index}")
        writer.join("one")
        writer.send("for one")
        wait_until("room one's readers woken", lambda: readers[0].wait(0.5))
        wait_until("room one's readers woken", lambda: readers[1].wait(0.5))
        assert [m.text for m in readers[0].receive()] == ["for one"]
        assert readers[2].wait(0.3) is False  # room two heard nothing
        assert listener.foreign == 0  # nothing arrived for channels nobody here wants
    finally:
        for client in (*readers, writer):
            client.close()
        for db in dbs:
            db.close()
    wait_until("the listener gone", lambda: _clients_of(cluster, "chatzeo-listener") == 0)


def test_a_database_with_the_old_trigger_still_delivers(cluster, target):
    # Databases prepared before the per-object channels had one channel for all;
    # their readers still work (hearing everything) until init-db is run again.
    import psycopg2

    from chatzeo import postgres

    connection = psycopg2.connect(cluster.dsn("chat"))
    with connection, connection.cursor() as cursor:
        cursor.execute("""
            CREATE OR REPLACE FUNCTION chatzeo_notify() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_notify('chatzeo', NEW.zoid::text); RETURN NULL; END $$;
            DROP TRIGGER chatzeo_notify_each ON object_state;
            CREATE TRIGGER chatzeo_notify AFTER INSERT OR UPDATE ON object_state
                FOR EACH ROW EXECUTE FUNCTION chatzeo_notify();
        """)
    connection.close()
    reader_db, writer_db = open_db(target), open_db(target)
    reader, writer = ChatClient(reader_db), ChatClient(writer_db, "olga")
    try:
        reader.join("old")
        writer.join("old")
        reader.wait(1)
        reader.receive()
        writer.send("still pushed")
        wait_until("the old trigger's NOTIFY", lambda: reader.wait(0.5))
        assert [m.text for m in reader.receive()] == ["still pushed"]
    finally:
        for client in (reader, writer):
            client.close()
            client.db.close()
    init_db(target)  # upgrades the trigger
    check = open_db(target)
    try:
        assert postgres._trigger_kind(_dsn(check.storage)) == "each"
    finally:
        check.close()
