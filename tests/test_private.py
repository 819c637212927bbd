"""Identity, private rooms and direct messages against a real `chatzeo serve --tls auto`.

One server for the module, made exactly as an operator makes it: ``chatzeo serve
--tls auto`` creates its CA in the data directory, ``chatzeo invite NAME`` writes
each user's identity file. Every test works in rooms of its own. The non-member
(carol, with a valid certificate of the same CA) tries every read path a ZEO
client has; each attempt is checked against a control (a member, or a load of an
oid that does not exist) so that no check passes by being unable to fail.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
from support import REPO, gather
from ZEO.ClientStorage import ClientStorage
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64

from chatzeo import open_db
from chatzeo.client import ChatClient
from chatzeo.errors import (
    NotAMember,
    PrivateRoomsNeedTLS,
    ProtocolViolation,
    ServerUnavailable,
    TrustViolation,
)
from chatzeo.realm import get_root
from chatzeo.testing import ServerProcess, chatzeo_command, wait_until
from chatzeo.tls import load_identity

pytestmark = pytest.mark.timeout(180)

USERS = ("alice", "bob", "carol", "dave")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        chatzeo_command(*args), capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, **(env or {})},
    )


class Site:
    """The module's server and the identity files of its users."""

    def __init__(self, server: ServerProcess, identities: dict[str, Path]):
        self.server = server
        self.identities = identities
        self.clients: list[ChatClient] = []

    def client(self, name: str) -> ChatClient:
        identity = load_identity(self.identities[name])
        db = open_db(identity.server, ssl=identity.context, wait=15)
        client = ChatClient(db, identity.name)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            try:
                client.close()
            finally:
                client.db.close()
        self.clients.clear()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("private")
    server = ServerProcess(directory / "data", options=("--tls", "auto")).start()
    try:
        identities = {}
        for name in USERS:
            out = directory / f"{name}.chatzeo"
            done = run("invite", name, "--config", str(REPO / "zeo.conf"),
                       "--data-dir", str(server.data_dir), "--server", server.address,
                       "--out", str(out))
            assert done.returncode == 0, done.stderr
            identities[name] = out
        yield Site(server, identities)
    finally:
        server.stop()


@pytest.fixture
def people(site: Site) -> Iterator[Site]:
    try:
        yield site
    finally:
        site.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns() % 10**9}"


def server_tid(client: ChatClient) -> bytes:
    return client.db.storage._call("lastTransaction")


def caught_up(client: ChatClient) -> None:
    wait_until("the client to hear of every commit", lambda: (
        client.db.storage.lastTransaction() == server_tid(client)))


def room_oids(client: ChatClient) -> list[bytes]:
    """Every object of the member ``client``'s current private room, loaded."""
    private = client.private
    assert private is not None
    session = private.session
    objects: list[Any] = [private, session, session._clock, session._messages,
                          session.presence]
    for tree in (session._messages, session.presence):
        bucket = tree._firstbucket
        while bucket is not None:
            objects.append(bucket)
            bucket = bucket._next
    return [obj._p_oid for obj in objects if obj._p_oid is not None]


def record_invalidations(client: ChatClient) -> list[bytes]:
    """The oids ZEO's IO thread hands this client from now on."""
    seen: list[bytes] = []
    storage = client.db.storage
    original = storage.invalidateTransaction

    def spy(tid: bytes, oids: Any) -> Any:
        seen.extend(oids)
        return original(tid, oids)

    storage.invalidateTransaction = spy
    original_info = storage.info

    def info_spy(values: Any) -> Any:
        # Fan-out (chatzeo.server.fanout) sends a watched object's change, with its new
        # state, in an info message instead.
        if isinstance(values, dict) and "chatzeo_push" in values:
            _, oids, carried = values["chatzeo_push"]
            seen.extend(oids)
            seen.extend(oid for oid, _ in carried)
        return original_info(values)

    storage.info = info_spy
    return seen


def assert_cannot_read(client: ChatClient, oids: list[bytes]) -> None:
    """Every read path of a ZEO client, for each oid, answers as for a missing oid."""
    storage = client.db.storage
    tid = server_tid(client)
    missing = p64(u64(max(oids)) + 10_000)  # an oid nobody allocated
    with pytest.raises(POSKeyError):  # the control: an oid that does not exist
        storage._call("loadBefore", missing, p64(u64(tid) + 1))
    # Refused as missing by the read guard, or (loadSerial, history) to every chat
    # client by the protocol checks (chatzeo.server.protocol): either way, no data.
    refused = (POSKeyError, ProtocolViolation)
    for oid in oids:
        with pytest.raises(POSKeyError):
            storage._call("loadBefore", oid, p64(u64(tid) + 1))
        with pytest.raises(refused):
            storage._call("loadSerial", oid, tid)
        with pytest.raises(refused):
            storage._call("history", oid, 1)
        with pytest.raises(POSKeyError):
            storage.load(oid)  # the normal ZODB path, through the client cache
    # Prefetch asks the server in the background: nothing may land in the cache.
    storage.prefetch(oids, tid)
    storage._call("lastTransaction")  # a round trip after the prefetch's loads
    assert all(storage._cache.load(oid) is None for oid in oids)
    with pytest.raises(Exception):  # noqa: B017 (refused, whatever the error)
        storage._call("record_iternext", None)
    # The transaction iterator (if this server lets chat clients use it at all).
    try:
        iterator = storage._call("iterator_start", None, None)
    except Exception:
        iterator = None  # refused outright: nothing to leak
    if iterator is not None:
        records: set[bytes] = set()
        for _ in range(100_000):
            info = storage._call("iterator_next", iterator)
            if info is None:
                break
            inner = storage._call("iterator_record_start", iterator, info[0])
            while (record := storage._call("iterator_record_next", inner)) is not None:
                records.add(record[0])
        assert records and not records & set(oids)  # public records seen, no private one
    # The undo log holds transaction metadata only, and chatzeo's clients write none.
    try:
        log = storage._call("undoLog", 0, 100_000)
    except Exception:
        log = []
    assert all(entry.get("description") in (b"", b"initial database creation")
               and not entry.get("user_name") for entry in log)


def test_invite_writes_an_identity_file_and_the_name_follows_it(site: Site) -> None:
    alice = site.identities["alice"]
    assert stat.S_IMODE(alice.stat().st_mode) == 0o600
    text = alice.read_text()
    assert text.count("BEGIN CERTIFICATE") == 2 and "PRIVATE KEY" in text
    assert stat.S_IMODE((site.server.data_dir / "tls" / "ca.key").stat().st_mode) == 0o600
    room = unique("hall")
    # No --server and no --name: both come from the identity file.
    sent = run("send", "--identity", str(alice), "--room", room, "hello from a certificate")
    assert sent.returncode == 0, sent.stderr
    shown = run("history", "--identity", str(site.identities["bob"]), "--room", room)
    assert shown.returncode == 0, shown.stderr
    assert "<alice> hello from a certificate" in shown.stdout
    # A name other than the certificate's is refused before anything is sent.
    forged = run("send", "--identity", str(alice), "--name", "bob", "--room", room, "x")
    assert forged.returncode == 1
    assert forged.stderr.strip().count("\n") == 0 and "differs from the name" in forged.stderr
    # The default per-user location is used when nothing else is given.
    config = site.server.data_dir.parent / "home-config"
    (config / "chatzeo").mkdir(parents=True, exist_ok=True)
    default = config / "chatzeo" / "identity.chatzeo"
    default.write_bytes(site.identities["bob"].read_bytes())
    default.chmod(0o600)
    env = {"XDG_CONFIG_HOME": str(config), "CHATZEO_SERVER": "", "CHATZEO_IDENTITY": ""}
    sent = run("send", "--room", room, "from the default identity", env=env)
    assert sent.returncode == 0, sent.stderr
    shown = run("history", "--identity", str(alice), "--room", room)
    assert "<bob> from the default identity" in shown.stdout
    # A second invite of the same name does not overwrite the file.
    again = run("invite", "alice", "--data-dir", str(site.server.data_dir), "--out", str(alice))
    assert again.returncode == 1 and "exists" in again.stderr


def test_an_identity_file_others_can_read_is_refused(site: Site, tmp_path: Path) -> None:
    loose = tmp_path / "loose.chatzeo"
    loose.write_bytes(site.identities["alice"].read_bytes())
    loose.chmod(0o644)
    done = run("history", "--identity", str(loose))
    assert done.returncode == 1
    assert "can be read by others" in done.stderr and "Traceback" not in done.stderr


def test_without_tls_there_are_no_private_rooms(server: ServerProcess) -> None:
    db = open_db(server.address)
    client = ChatClient(db, "alice")
    try:
        client.join("lobby")
        with pytest.raises(PrivateRoomsNeedTLS, match="TLS client certificates"):
            client.create_private("secret")
        with pytest.raises(PrivateRoomsNeedTLS):
            client.direct("bob")
        # Even a client that claims a certificate finds no directory to write to.
        client.certified = True
        with pytest.raises(PrivateRoomsNeedTLS, match="keeps no private rooms"):
            client.create_private("secret")
    finally:
        client.close()
        db.close()


def test_a_member_reads_and_posts_a_non_member_gets_nothing(people: Site) -> None:
    alice, bob, carol = people.client("alice"), people.client("bob"), people.client("carol")
    name = unique("plans")
    for client in (alice, bob, carol):
        client.join("lobby")
    alice.create_private(name)
    assert alice.invite("bob") is True
    carol_saw = record_invalidations(carol)
    bob_saw = record_invalidations(bob)
    alice.send("the plan is secret")
    assert [m.text for m in bob.join(name)] == ["the plan is secret"]
    bob.send("agreed")
    got: list[Any] = []
    wait_until("bob's post at alice", gather(got, alice.receive, 2))
    assert [(m.author, m.text) for m in got] == [
        ("alice", "the plan is secret"), ("bob", "agreed")]
    assert bob.members() == ("alice", ("alice", "bob"))
    assert any(f"#{name} (private)" == shown for shown, _ in bob.rooms())
    # carol: not listed, not joinable, every read path refused, no invalidation heard.
    assert not any(name in shown for shown, _ in carol.rooms())
    with pytest.raises(LookupError):
        carol.join(name, create=False)
    oids = room_oids(alice)
    assert_cannot_read(carol, oids)
    assert alice.room is not None
    clock = alice.room._clock._p_oid
    alice.send("one more")  # bob reads the room now: he must hear of this post
    wait_until("bob to hear of the clock (the control)", lambda: clock in bob_saw)
    caught_up(carol)
    assert not set(oids) & set(carol_saw)
    # Guessing: every oid the server has handed out, tried one by one.
    last = u64(max(oids))
    guessed = [p64(n) for n in range(last + 1)]
    readable = []
    for oid in guessed:
        try:
            carol.db.storage._call("loadBefore", oid, p64(u64(server_tid(carol)) + 1))
            readable.append(oid)
        except POSKeyError:
            pass
    assert not set(readable) & set(oids)
    assert len(readable) > 5  # the control: the public graph is readable


def test_non_members_and_members_cannot_change_what_is_not_theirs(people: Site) -> None:
    alice, bob, carol = people.client("alice"), people.client("bob"), people.client("carol")
    name = unique("vault")
    alice.join("lobby")
    alice.create_private(name)
    alice.invite("bob")
    bob.join(name)
    assert alice.private is not None
    clock = alice.room._clock  # type: ignore[union-attr]
    clock_oid, serial = clock._p_oid, clock._p_serial
    # carol writes the clock blind (she cannot load it): refused at the vote.
    storage = carol.db.storage
    meta = TransactionMetaData()
    storage.tpc_begin(meta)
    storage.store(clock_oid, serial, b"junk", "", meta)
    with pytest.raises(TrustViolation, match=r"^private: only the members"):
        storage.tpc_vote(meta)
    storage.tpc_abort(meta)
    # Nor may she ask whether the clock's serial is still current (the conflict's
    # answer would say when it last changed).
    meta = TransactionMetaData()
    storage.tpc_begin(meta)
    storage.checkCurrentSerialInTransaction(clock_oid, serial, meta)
    with pytest.raises(TrustViolation, match=r"^private: only the members of a private room"):
        storage.tpc_vote(meta)
    storage.tpc_abort(meta)
    # bob, a member but not the owner, cannot let carol in.
    with pytest.raises(TrustViolation, match=r"^private: only the owner"):
        manager = transaction.TransactionManager()
        connection = bob.db.open(transaction_manager=manager)
        try:
            room = connection.get(alice.private._p_oid)
            room.members = ("alice", "bob", "carol")
            manager.commit()
        finally:
            manager.abort()
            connection.close()
    with pytest.raises(Exception, match="only alice"):
        bob.invite("carol")
    # carol links into the directory a room "owned" by alice that lets her in.
    from chatzeo.privacy import PrivateRoom, new_key

    def plant(owner: str) -> None:
        manager = transaction.TransactionManager()
        connection = carol.db.open(transaction_manager=manager)
        try:
            key = new_key()
            get_root(connection).private[key] = PrivateRoom(key, "trap", "room", owner,
                                                             ["carol"])
            manager.commit()
        finally:
            manager.abort()
            connection.close()

    with pytest.raises(TrustViolation, match=r"^private: 'carol' cannot create"):
        plant("alice")
    plant("carol")  # the control: her own room is accepted
    # bob cannot post as alice in the private room either (the commit guard).
    with pytest.raises(TrustViolation, match=r"^author:"):
        bob.room.add_message("forged", author="alice")  # type: ignore[union-attr]


def test_kick_cuts_access_at_once_and_a_reinvite_sees_the_gap(people: Site) -> None:
    alice, bob = people.client("alice"), people.client("bob")
    name = unique("board")
    alice.join("lobby")
    alice.create_private(name)
    alice.invite("bob")
    alice.send("before")
    assert [m.text for m in bob.join(name)] == ["before"]
    oids = room_oids(bob)  # loaded into bob's cache
    bob_saw = record_invalidations(bob)
    assert alice.kick("bob") is True
    # Bob's connection stays open; the server refuses him from the kick's commit on,
    # and tells him to drop every object of the room.
    caught_up(bob)
    assert set(oids) <= set(bob_saw)
    alice.send("after the kick")
    with pytest.raises(NotAMember, match="no longer a member"):
        wait_until("bob to notice", lambda: bob.receive() and False, timeout=5)
    assert_cannot_read(bob, oids)
    assert not any(name in shown for shown, _ in bob.rooms())
    # Invited again: the message posted while he was out is there, not a stale cache.
    alice.invite("bob")
    caught_up(bob)
    assert [m.text for m in bob.join(name)] == ["before", "after the kick"]


def test_a_direct_conversation_while_a_third_watches(people: Site) -> None:
    alice, bob, carol = people.client("alice"), people.client("bob"), people.client("carol")
    for client in (alice, bob, carol):
        client.join("lobby")
    carol_saw = record_invalidations(carol)
    alice.send_direct("bob", "just between us")
    assert [m.text for m in bob.join("@alice")] == ["just between us"]
    bob.send("agreed, quietly")
    assert [m.text for m in alice.join("@bob")] == ["just between us", "agreed, quietly"]
    assert ("@bob", 2) in alice.rooms() and ("@alice", 2) in bob.rooms()
    assert not any(shown.startswith("@") for shown, _ in carol.rooms())
    with pytest.raises(NotAMember):
        carol.direct("alice", create=False)  # carol has no conversation with alice
    oids = room_oids(alice)
    assert_cannot_read(carol, oids)
    caught_up(carol)
    assert not set(oids) & set(carol_saw)
    # A conversation keeps its two members.
    with pytest.raises(Exception, match="two members"):
        alice.invite("carol")


def test_a_warm_cache_does_not_bring_back_a_room(people: Site, tmp_path: Path) -> None:
    alice = people.client("alice")
    name = unique("cache")
    alice.join("lobby")
    alice.create_private(name)
    alice.invite("bob")
    alice.send("seen while a member")
    identity = load_identity(people.identities["bob"])
    address = people.server.address.split(":")
    cached = tmp_path / "bob-cache"
    cached.mkdir()

    def open_bob() -> Any:
        storage = ClientStorage((address[0], int(address[1])), client="bob", var=str(cached),
                                ssl=identity.context, ssl_server_hostname=None, wait_timeout=15)
        return storage

    storage = open_bob()
    bob_db = open_db_from(storage)
    warm = ChatClient(bob_db, "bob")
    try:
        warm.certified = True
        assert [m.text for m in warm.join(name)] == ["seen while a member"]
        oids = room_oids(warm)
    finally:
        warm.close()
        bob_db.close()
    alice.kick("bob")
    alice.send("posted after bob left")
    storage = open_bob()  # the same persistent cache file
    bob_db = open_db_from(storage)
    try:
        for oid in oids:
            with pytest.raises(POSKeyError):
                storage._call("loadBefore", oid, p64(u64(storage._call("lastTransaction")) + 1))
        texts = []
        manager = transaction.TransactionManager()
        connection = bob_db.open(transaction_manager=manager)
        try:
            session = connection.get(oids[1])
            texts = [m.text for m in session.latest(10)]
        except POSKeyError:
            texts = []
        finally:
            manager.abort()
            connection.close()
        # What bob's own cache file kept from his membership, and nothing newer:
        # the server told him of no change to the room since he left.
        assert texts == ["seen while a member"]
    finally:
        bob_db.close()


def open_db_from(storage: Any) -> Any:
    import ZODB

    from chatzeo.allowlist import class_factory

    return ZODB.DB(storage, class_factory=class_factory)


def test_revocation_closes_open_connections_and_refuses_new_ones(people: Site) -> None:
    dave = people.client("dave")
    dave.join("lobby")
    dave.send("dave was here")
    revoked = run("revoke", "dave", "--data-dir", str(people.server.data_dir))
    assert revoked.returncode == 0, revoked.stderr
    log = people.server.log
    wait_until("the server to close dave's connection",
               lambda: "certificate 'dave' was revoked" in log.read_text(), timeout=10)
    identity = load_identity(people.identities["dave"])
    with pytest.raises(ServerUnavailable, match="refused this client: this certificate was "
                       "revoked"):
        open_db(identity.server, ssl=identity.context, wait=3)
    refused = run("send", "--identity", str(people.identities["dave"]), "--wait", "3", "hi")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "this certificate was revoked" in refused.stderr
    # Others are unaffected.
    alice = people.client("alice")
    alice.join("lobby")
    alice.send("still here")
    again = run("revoke", "nobody-issued", "--data-dir", str(people.server.data_dir))
    assert again.returncode == 1 and "no certificate was issued" in again.stderr


def test_slash_commands_in_the_chat_worker(people: Site) -> None:
    """What /create, /invite, /members, /msg, /query and a /kick do in `chatzeo chat`'s
    worker (the terminal's database thread), as the terminal sends them."""
    from test_terminal import Events

    from chatzeo.terminal.commands import parse
    from chatzeo.terminal.events import (
        Arrived,
        Joined,
        Landed,
        Notice,
        Outgoing,
        Problem,
    )
    from chatzeo.terminal.worker import ClientWorker

    identity = load_identity(people.identities["bob"])
    bob_db = open_db(identity.server, ssl=identity.context, wait=15)
    events = Events()
    worker = ClientWorker(lambda: ChatClient(bob_db, "bob"), "lobby", events.deliver)
    alice = people.client("alice")
    try:
        assert worker.start().result(timeout=30).room == "lobby"
        name = unique("crew")
        worker.submit(parse(f"/create {name}"))  # type: ignore[arg-type]
        joined = events.next(Joined)
        # Opened beside the lobby, under its label (no public name can equal it).
        assert joined.shown == joined.room == f"#{name} (private)"
        assert joined.rooms == ("lobby", joined.room)
        worker.submit(parse("/invite alice"))  # type: ignore[arg-type]
        assert events.next(Notice).lines == ("invited alice",)
        worker.submit(parse("/members"))  # type: ignore[arg-type]
        assert events.next(Notice).lines == ("members: alice, bob (owner)",)
        worker.submit(Outgoing(1, "welcome aboard"))
        assert [m.text for m in events.next(Landed).messages] == ["welcome aboard"]
        assert [m.text for m in alice.join(name)] == ["welcome aboard"]
        alice.send("thanks")
        assert [m.text for m in events.next(Arrived).messages] == ["thanks"]
        with pytest.raises(Exception, match="only bob"):
            alice.kick("bob")
        worker.submit(parse("/msg alice a word in private"))  # type: ignore[arg-type]
        assert events.next(Notice).lines[0] == "-> alice: a word in private"
        # (The module's earlier tests may have left messages in this conversation.)
        assert [m.text for m in alice.join("@bob")][-1] == "a word in private"
        worker.submit(parse("/query alice"))  # type: ignore[arg-type]
        joined = events.next(Joined)
        assert joined.shown == "@alice" and joined.page[-1].text == "a word in private"
        worker.submit(parse(f"/join {name}"))  # type: ignore[arg-type]
        assert events.next(Joined).shown == f"#{name} (private)"
        worker.submit(parse("/kick alice"))  # type: ignore[arg-type]
        assert events.next(Notice).lines == ("removed alice",)
        worker.submit(parse("/kick alice"))  # type: ignore[arg-type]
        assert events.next(Notice).lines == ("not a member: alice",)
        # alice, inside the room when removed, is told and put back in the lobby.
        alice_events = Events()
        alice_worker = ClientWorker(lambda: ChatClient(alice.db, "alice"), "lobby",
                                    alice_events.deliver)
        try:
            alice_worker.start().result(timeout=30)
            worker.submit(parse("/invite alice"))  # type: ignore[arg-type]
            events.next(Notice)
            alice_worker.submit(parse(f"/join {name}"))  # type: ignore[arg-type]
            assert alice_events.next(Joined).shown == f"#{name} (private)"
            worker.submit(parse("/kick alice"))  # type: ignore[arg-type]
            events.next(Notice)
            assert "no longer a member" in alice_events.next(Problem).text
            assert alice_events.next(Joined).room == "lobby"
        finally:
            alice_worker.stop()
    finally:
        worker.stop()
        bob_db.close()


def test_serving_private_rooms_without_tls_is_refused(site: Site, tmp_path: Path) -> None:
    """A database with private rooms must not be served to everybody: the server
    refuses to start without client certificates."""
    alice = site.client("alice")
    try:
        alice.join("lobby")
        alice.create_private(unique("kept"))
    finally:
        site.close()
    site.server.stop()
    try:
        plain = ServerProcess(site.server.data_dir, options=())
        done = subprocess.run(
            chatzeo_command("serve", "--config", str(plain.config), "--address", plain.address,
                            "--data-dir", str(plain.data_dir)),
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 1
        assert "holds private rooms" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        site.server.start()
    # After a restart with TLS, the index is rebuilt from the file: still private.
    alice, carol = site.client("alice"), site.client("carol")
    try:
        rooms = [shown for shown, _ in alice.rooms() if shown.endswith("(private)")]
        assert rooms
        alice._manager.begin()
        oids = [room._p_oid for room in alice._visible() if "carol" not in room.members]
        assert oids
        assert_cannot_read(carol, oids)
    finally:
        site.close()


def test_a_database_served_without_tls_gains_private_rooms_with_it(tmp_path: Path) -> None:
    """A file written by a server without certificates (chatzeo before private
    rooms, or today without TLS: the root has no ``private``) keeps working when
    served with ``--tls auto``, which adds the directory of private rooms."""
    data = tmp_path / "data"
    plain = ServerProcess(data).start()
    try:
        db = open_db(plain.address)
        client = ChatClient(db, "alice")
        client.join("lobby")
        client.send("from before TLS")
        client.close()
        db.close()
    finally:
        plain.stop()
    secured = ServerProcess(data, port=plain.port, options=("--tls", "auto")).start()
    try:
        out = tmp_path / "alice.chatzeo"
        done = run("invite", "alice", "--data-dir", str(data), "--out", str(out))
        assert done.returncode == 0, done.stderr
        identity = load_identity(out)
        assert identity.server == "127.0.0.1:8765"  # the config's, unless told otherwise
        db = open_db(secured.address, ssl=identity.context)
        client = ChatClient(db, "alice")
        try:
            assert [m.text for m in client.join("lobby")] == ["from before TLS"]
            client.create_private("first")
            client.send("kept")
            assert ("#first (private)", 1) in client.rooms()
        finally:
            client.close()
            db.close()
    finally:
        secured.stop()
