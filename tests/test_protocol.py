"""The ZEO protocol boundary of `chatzeo serve` (chatzeo.server.protocol), attacked as a raw client.

Every attack runs against a real server in both modes: the default loopback server
and TLS with client certificates (and so the commit guard). `test_plain_zeo_...` is
the control: the same attacks against ZEO's own runzeo work, so the payloads here
are live. Each refusal is checked where it shows: the client's error, the server's
log line, and the storage (nothing written).
"""

from __future__ import annotations

import contextlib
import pickle
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
import ZODB
from protocol_client import (
    TRANSACTION_TIMEOUT,
    ExecPayload,
    RawClient,
    Served,
    cli,
    closed_by_peer,
    persistent_record,
    raw_socket,
    send_frame,
)
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import p64, u64, z64

from chatzeo import open_db
from chatzeo.errors import ProtocolViolation, TooManyConnections
from chatzeo.realm import get_root
from chatzeo.records import stored_extension
from chatzeo.testing import Pki, chatzeo_command, make_pki, openssl_missing, require, wait_until

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require("openssl", openssl_missing())
    return make_pki(tmp_path_factory.mktemp("pki"), clients=("alice", "bob", "admin"))


@pytest.fixture(params=["default", "tls"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    pki = request.getfixturevalue("pki") if request.param == "tls" else None
    options = ("--operator", "admin") if pki is not None else ()
    server = Served(tmp_path / "server", pki=pki, options=options).start()
    try:
        yield server
    finally:
        server.stop()


def send(server: Served, text: str, wait: float = 10, name: str = "alice") -> tuple[int, str]:
    status, _, err, _ = cli("send", *server.cli_args(name), "--name", name, "--room", "lobby",
                            "--wait", str(wait), text)
    return status, err


def post(server: Served, texts: list[str], name: str = "alice") -> None:
    """Post ``texts`` to lobby as ``name``, each acknowledged (add_message returned)."""
    db = open_db(server.address, ssl=server.context(name))
    try:
        connection = db.open(transaction_manager=transaction.TransactionManager())
        room = get_root(connection).rooms.get("lobby")
        if room is None:
            with connection.transaction_manager:
                room = get_root(connection).room("lobby")
        for text in texts:
            room.add_message(text, name)
        connection.close()
    finally:
        db.close()


def history(server: Served) -> list[str]:
    status, out, err, _ = cli("history", *server.cli_args("bob"), "--room", "lobby",
                              "--limit", "100")
    assert status == 0, err
    return [line.split("> ", 1)[1] for line in out.splitlines()]


def refusals(server: Served) -> list[str]:
    return [line for line in server.log_text().splitlines() if "refused" in line]


# -- code execution ------------------------------------------------------------------


def test_a_pickle_in_a_protocol_message_never_runs(served: Served, tmp_path: Path) -> None:
    marker = tmp_path / "wire-marker"
    sock = raw_socket(served)
    send_frame(sock, pickle.dumps((1, False, "ping", ExecPayload(marker)), 3))
    assert closed_by_peer(sock), "the server kept a connection that sent a hostile pickle"
    sock.close()
    line = served.logged("undecodable message")
    assert "builtins.exec" in line
    assert not marker.exists()
    assert send(served, "still serving")[0] == 0
    assert "Traceback" not in served.log_text()


def test_a_hostile_extension_is_refused_and_undo_log_reads_too(
    served: Served, tmp_path: Path
) -> None:
    marker = tmp_path / "ext-marker"
    assert send(served, "hello")[0] == 0
    raw = RawClient(served)
    try:
        last = raw.last_transaction()
        for ext, reason in (
            (pickle.dumps(ExecPayload(marker), 3), "must be a mapping, not raw bytes"),
            ({"nested": {"a": 1}}, "not a plain value"),
            ({1: "x"}, "keys must be str"),
            (["a"], "must be a mapping, not list"),
        ):
            txn = raw.begin(ext=ext)
            raw.store(txn, persistent_record({"x": 1}))
            with pytest.raises(ProtocolViolation, match=reason):
                raw.vote(txn)
            assert raw.last_transaction() == last
        for call, args in (("undoLog", (0, 20)), ("undoInfo", (0, 20, None)),
                           ("history", (z64, 10))):
            with pytest.raises(ProtocolViolation, match=f"^{call} is not accepted: it "
                               "unpickles stored transaction extensions"):
                raw.call(call, *args)
        assert raw.last_transaction() == last
    finally:
        raw.close()
    assert not marker.exists()
    served.logged("refused a transaction: the extension must be a mapping")
    # An honest extension is stored as the server's own pickle of a plain dict.
    db = open_db(served.address, ssl=served.context("alice"))
    try:
        manager = transaction.TransactionManager()
        connection = db.open(transaction_manager=manager)
        manager.get().setExtendedInfo("note", "room made by a test")
        get_root(connection).room("with-extension")
        manager.commit()
        connection.close()
    finally:
        db.close()
    storage = FileStorage(str(served.data_dir / "chat.fs"), read_only=True)
    try:
        extensions = [record.extension_bytes for record in storage.iterator()]
    finally:
        storage.close()
    assert stored_extension(extensions[-1]) == {"note": "room made by a test"}
    assert all(stored_extension(ext) is not None for ext in extensions)


def test_an_old_file_with_a_hostile_extension_is_never_unpickled(
    tmp_path: Path, pki: Pki
) -> None:
    marker = tmp_path / "old-marker"
    data = tmp_path / "server"
    data.mkdir()
    # Written as an old server accepted it: chatzeo's objects, then a transaction
    # whose extension is the payload's pickle (FileStorage keeps bytes as given).
    storage = FileStorage(str(data / "chat.fs"))
    db = ZODB.DB(storage)
    with db.transaction() as connection:
        get_root(connection).room("lobby").post("from the old days", "alice")
    hostile = TransactionMetaData(extension=pickle.dumps(ExecPayload(marker), 3))
    storage.tpc_begin(hostile)
    storage.store(storage.new_oid(), z64, persistent_record({"x": 1}), "", hostile)
    storage.tpc_vote(hostile)
    storage.tpc_finish(hostile)
    db.close()
    written = FileStorage(str(data / "chat.fs"), read_only=True)
    try:
        ext = [record.extension_bytes for record in written.iterator()][-1]
    finally:
        written.close()
    assert ext.startswith(b"\x80") and stored_extension(ext) is None
    # check names the transaction without loading its extension.
    status, _out, err, _ = cli("check", str(data / "chat.fs"))
    assert status == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "has an extension that is not a plain mapping" in err
    assert not marker.exists()
    server = Served(data).start()
    try:
        assert history(server) == ["from the old days"]
        raw = RawClient(server)
        try:
            for call, args in (("undoLog", (0, 20)), ("undoInfo", (0, 20, None)),
                               ("history", (z64, 10))):
                with pytest.raises(ProtocolViolation, match=f"^{call} is not accepted"):
                    raw.call(call, *args)
        finally:
            raw.close()
    finally:
        server.stop()
    assert not marker.exists()


# -- history: tids and status --------------------------------------------------------


def test_client_chosen_tid_and_status_are_refused_and_the_file_stays_clean(
    served: Served,
) -> None:
    post(served, [f"before {index}" for index in range(5)])
    raw = RawClient(served)
    try:
        last = raw.last_transaction()
        future = TimeStamp(2100, 1, 1, 0, 0, 0).raw()
        for tid, state, reason in (
            (None, "c", "may not set the transaction status 'c'"),
            (None, "u", "may not set the transaction status 'u'"),
            (future, " ", "may not choose the transaction's tid"),
            (p64(u64(last) - 1000), " ", "may not choose the transaction's tid"),
        ):
            txn = raw.begin(tid=tid, status=state)
            raw.store(txn, persistent_record({"x": 1}))
            with pytest.raises(ProtocolViolation, match=reason):
                raw.vote(txn)
            assert raw.last_transaction() == last
    finally:
        raw.close()
    post(served, [f"after {index}" for index in range(3)])
    served.kill()
    served.start()
    expected = [f"before {i}" for i in range(5)] + [f"after {i}" for i in range(3)]
    assert history(served) == expected
    status, out, err, _ = cli("check", str(served.data_dir / "chat.fs"))
    assert status == 0 and "ok" in out, err
    assert not list(served.data_dir.glob("chat.fs.tr*"))
    raw = RawClient(served)
    try:
        assert TimeStamp(raw.last_transaction()).timeTime() < time.time() + 3600
    finally:
        raw.close()


# -- calls chatzeo never makes -------------------------------------------------------

REFUSED_CALLS: list[tuple[str, tuple[Any, ...], str]] = [
    ("undoLog", (0, 1), "undoLog is not accepted"),
    ("undoInfo", (0, 1, None), "undoInfo is not accepted"),
    ("history", (z64,), "history is not accepted"),
    ("loadSerial", (z64, z64), "loadSerial is not accepted"),
    ("getTid", (z64,), "getTid is not accepted"),
    ("record_iternext", (None,), "record_iternext is not accepted"),
    ("iterator_start", (None, None), "iterator_start is not accepted"),
    ("iterator_next", (0,), "iterator_next is not accepted"),
    ("iterator_record_start", (0, z64), "iterator_record_start is not accepted"),
    ("sendBlob", (z64, z64), "sendBlob is not accepted"),
    ("storeBlobStart", (), "storeBlobStart is not accepted"),
    ("new_oid", (), "new_oid is not accepted"),
    ("no_such_call", (), "is not a call accepted now"),
    ("loadBefore", ("oid", z64), "loadBefore: argument 1 must be 8 bytes"),
    ("loadBefore", (z64,), "loadBefore takes 2 arguments, not 1"),
    ("new_oids", (10**9,), "new_oids: argument 1 must be a count"),
    ("register", ("1", False), "register is not a call accepted now"),
]


def test_calls_chatzeo_never_makes_are_refused(served: Served) -> None:
    raw = RawClient(served)
    try:
        last = raw.last_transaction()
        before = len(refusals(served))
        for call, args, reason in REFUSED_CALLS:
            with pytest.raises(ProtocolViolation, match=reason):
                raw.call(call, *args)
        # One log line per refusal.
        wait_until("a log line per refusal",
                   lambda: len(refusals(served)) >= before + len(REFUSED_CALLS))
        assert len(refusals(served)) == before + len(REFUSED_CALLS)
        # Inside a transaction an asynchronous call cannot be answered: its vote is.
        oid = raw.new_oid()
        for call, args in (
            ("deleteObject", (oid, z64)),
            ("restorea", (oid, z64, persistent_record({}), None)),
            ("undoa", (last,)),
            ("storeBlobEnd", (oid, z64, persistent_record({}))),
            ("storeBlobShared", (oid, z64, persistent_record({}), "x.tmp")),
        ):
            txn = raw.begin()
            raw.cast(call, *args, txn)
            with pytest.raises(ProtocolViolation, match=f"^{call} is not accepted"):
                raw.vote(txn)
        assert raw.last_transaction() == last
        assert raw.call("ping") is None  # the connection is still good
    finally:
        raw.close()
    assert "Traceback" not in served.log_text()


def test_pack_is_for_operators(served: Served) -> None:
    assert send(served, "to pack")[0] == 0
    if served.pki is None:
        # Without TLS, a loopback client is the operator.
        status, _, err, _ = cli("pack", *served.cli_args("alice"))
        assert status == 0, err
        return
    status, _, err, _ = cli("pack", *served.cli_args("alice"))
    assert status == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "pack is for operators only (chatzeo serve --operator NAME)" in err
    status, _, err, _ = cli("pack", *served.cli_args("admin"))
    assert status == 0, err
    raw = RawClient(served, "bob")
    try:
        with pytest.raises(ProtocolViolation, match="server_status is for operators only"):
            raw.call("server_status")
    finally:
        raw.close()


# -- a hung writer -------------------------------------------------------------------


class HungWriter:
    """A writer that votes an honest post and never finishes: it holds the lock until
    the server's transaction timeout drops it."""

    def __init__(self, server: Served, name: str) -> None:
        self.db = open_db(server.address, ssl=server.context(name))
        manager = transaction.TransactionManager()
        connection = self.db.open(transaction_manager=manager)
        get_root(connection).room("lobby").post("never finished", name)
        self.txn = manager.get()
        connection.tpc_begin(self.txn)
        connection.commit(self.txn)
        connection.tpc_vote(self.txn)
        # What the storage knows this commit by (Connection.tpc_begin made it).
        self.meta_data = self.txn.data(connection)

    def close(self) -> None:
        # The server dropped the transaction; what is left is the client's own buffer
        # of it (a temporary file) and its local commit lock: tpc_end frees both.
        self.db.storage.tpc_end(self.meta_data)
        self.db.close()


def hold_commit_lock(server: Served, name: str = "alice") -> HungWriter:
    """A writer holding the commit lock (see `HungWriter`)."""
    return HungWriter(server, name)


def test_a_hung_writer_is_bounded(served: Served) -> None:
    assert send(served, "first")[0] == 0
    for round in range(2):  # ZEO's timeout fires once; the lock must come back twice
        logged = served.log_text().count("Transaction timeout")
        hung = hold_commit_lock(served)
        try:
            # A writer whose bound is shorter than the timeout gives up in one line...
            status, err = send(served, f"gave up {round}", wait=2)
            assert status == 1 and err.count("\n") == 1 and "Traceback" not in err, err
            assert re.search(r"commit lock stayed busy for [\d.]+s \(another writer", err)
            # ...one with a longer bound goes on once the server frees the lock.
            waiting = subprocess.Popen(
                chatzeo_command("send", *served.cli_args("alice"), "--name", "alice",
                                "--room", "lobby", "--wait", "20", f"went on {round}"),
                stderr=subprocess.PIPE,
            )
            def fired(before: int = logged) -> bool:
                return served.log_text().count("Transaction timeout") > before

            wait_until("the transaction timeout", fired, TRANSACTION_TIMEOUT + 15)
            _, err_bytes = waiting.communicate(timeout=30)
            assert waiting.returncode == 0, err_bytes
        finally:
            hung.close()
    assert history(served) == ["first", "went on 0", "went on 1"]


# -- sizes -------------------------------------------------------------------------


def test_oversized_records_and_transactions_are_refused_unbuffered(served: Served) -> None:
    assert send(served, "small")[0] == 0
    start = served.rss()
    raw = RawClient(served)
    try:
        last = raw.last_transaction()
        txn = raw.begin()
        raw.store(txn, b"x" * (64 * MiB))
        with pytest.raises(ProtocolViolation, match=r"a message of \d+ bytes is above the "
                           f"limit of {MiB + 64 * 1024}"):
            raw.vote(txn)
        grown = served.rss() - start
        assert grown < 32 * MiB, f"the server grew by {grown / MiB:.0f} MiB"
        # Nothing more of a refused transaction is kept, by the guard neither.
        txn = raw.begin()
        oid = raw.new_oid()
        raw.cast("storea", oid, z64, b"x" * (MiB + 1), txn)
        for _ in range(48):
            raw.cast("storea", oid, z64, b"y" * (MiB - 100), txn)
        raw.call("ping")  # every store above has arrived
        grown = served.rss() - start
        assert grown < 32 * MiB, f"the server grew by {grown / MiB:.0f} MiB"
        with pytest.raises(ProtocolViolation, match="a record of"):
            raw.vote(txn)
        for records, size, reason in (
            (1, MiB + 1, f"a record of {MiB + 1} bytes is above the limit of {MiB}"),
            (17, MiB - 100, f"a transaction may store at most {16 * MiB} bytes"),
            (10_001, 1, "a transaction may store at most 10000 records"),
        ):
            txn = raw.begin()
            oid = raw.new_oid()
            for _ in range(records):
                raw.cast("storea", oid, z64, b"x" * size, txn)
            with pytest.raises(ProtocolViolation, match=reason):
                raw.vote(txn)
        assert raw.last_transaction() == last
    finally:
        raw.close()
    # Outside a transaction an oversized message closes that connection only.
    sock = raw_socket(served)
    # OSError: closed by the server while this was still sending (checked next).
    with contextlib.suppress(OSError):
        sock.sendall((2 * MiB).to_bytes(4, "big") + b"\0" * (2 * MiB))
    assert closed_by_peer(sock)
    sock.close()
    served.logged("a message above the size limit outside a transaction")
    assert send(served, "still fine")[0] == 0
    grown = served.rss() - start
    assert grown < 48 * MiB, f"the server grew by {grown / MiB:.0f} MiB"
    assert history(served) == ["small", "still fine"]


# -- connections -------------------------------------------------------------------


def test_connections_per_certificate_are_limited(pki: Pki, tmp_path: Path) -> None:
    server = Served(tmp_path / "server", pki=pki, options=("--max-connections", "3")).start()
    held = []
    try:
        held = [open_db(server.address, ssl=server.context("alice")) for _ in range(3)]
        with pytest.raises(TooManyConnections, match="'alice' already has 3 live connections"):
            open_db(server.address, ssl=server.context("alice"))
        server.logged("certificate 'alice' already has 3 live connections")
        status, _, err, _ = cli("rooms", *server.cli_args("alice"))
        assert status == 1 and err.count("\n") == 1 and "Traceback" not in err
        assert "already has 3 live connections" in err
        # Another certificate is counted apart.
        assert cli("rooms", *server.cli_args("bob"))[0] == 0
        # A connection past the limit is closed by the server even if its client stays.
        sock = raw_socket(server, "alice")
        assert closed_by_peer(sock, timeout=20)
        sock.close()
        held.pop().close()

        def reconnects() -> bool:
            try:
                held.append(open_db(server.address, ssl=server.context("alice")))
            except TooManyConnections:
                return False
            return True

        wait_until("alice may connect again", reconnects)
    finally:
        for db in held:
            db.close()
        server.stop()


# -- the control: plain ZEO ------------------------------------------------------------


def test_plain_zeo_runs_the_attacks(tmp_path: Path) -> None:
    """The same payloads against ZEO's own runzeo: they run in the server, and a hung
    writer's lock is never released. (If this fails, the tests above prove nothing.)"""
    server = Served(tmp_path / "plain", plain=True).start()
    try:
        wire, ext = tmp_path / "wire-marker", tmp_path / "ext-marker"
        sock = raw_socket(server)
        send_frame(sock, pickle.dumps((1, False, "ping", ExecPayload(wire)), 3))
        wait_until("the wire payload to run", wire.exists)
        sock.close()
        raw = RawClient(server)
        try:
            txn = raw.begin(ext=pickle.dumps(ExecPayload(ext), 3))
            raw.store(txn, persistent_record({"x": 1}))
            raw.vote(txn)
            raw.finish(txn)
            # The payload runs while undoLog unpickles the extension; exec returns None,
            # which FileStorage's undoLog then fails to merge into its result.
            with pytest.raises(TypeError, match="'NoneType' object is not iterable"):
                raw.call("undoLog", 0, 20)
        finally:
            raw.close()
        wait_until("the extension payload to run", ext.exists)
        assert int(wire.read_text()) == int(ext.read_text()) == server.pid
        hung = hold_commit_lock(server)
        try:
            server.logged("Transaction timeout", TRANSACTION_TIMEOUT + 15)
            assert send(server, "after the timeout", wait=2)[0] == 1
        finally:
            hung.close()
    finally:
        server.stop()

