"""A chat used every day: joined rooms, read markers with positions, unread counts under
retention, mentions, catch-up, topics, and stored files written before any of them.

In-process databases (MappingStorage; FileStorage where conflicts must resolve);
tests/test_cli.py and tests/test_tmux.py run the same through real servers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import transaction
import ZODB
from ZODB.Connection import Connection
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError

from chatzeo import ChatClient, ChatSession, InvalidInput, ReadMarkers, get_root
from chatzeo.client import MARK_EVERY
from chatzeo.message import Message
from chatzeo.realm import ChatRoot
from chatzeo.session import RoomClock
from chatzeo.unread import latest_mentions, mentions, room_unread, unread_rooms


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def _open(db: ZODB.DB) -> tuple[transaction.TransactionManager, Connection, ChatRoot]:
    manager = transaction.TransactionManager(explicit=True)
    connection = db.open(transaction_manager=manager)
    manager.begin()
    return manager, connection, get_root(connection)


def _post(room: ChatSession, texts: Iterable[str], author: str = "bob") -> None:
    for text in texts:
        room.add_message(text, author)


# -- positions, unread and lost ----------------------------------------------------


def test_unread_count_is_arithmetic_on_the_clock_and_loads_no_messages(file_db):
    manager, connection, root = _open(file_db)
    room, user = root.room("general"), root.user("alice")
    manager.commit()
    _post(room, [f"m{i}" for i in range(100)])  # past FLUSH: most are in the tree
    manager.begin()
    messages = room.messages_after(0)
    user.own_markers().mark(room, messages[39])
    manager.commit()
    connection.close()
    file_db.cacheMinimize()

    manager, connection, root = _open(file_db)
    user, room = root.users["alice"], root.rooms["general"]
    markers = user.markers
    assert markers.position(room) == 40
    counted = (markers.unread_count(room), markers.lost(room))
    summary = room_unread(user, room, count_mentions=False)
    # Counted from the marker and the clock: the message tree is still a ghost.
    assert room._messages._p_changed is None
    assert counted == (60, 0) and summary.unread == 60
    assert len(room.messages_after(markers.get(room))) == 60
    manager.abort()
    connection.close()


def test_counts_under_retention_say_how_many_were_lost(db):
    manager, connection, root = _open(db)
    room, user = root.room("capped"), root.user("alice")
    room.max_messages = 5
    manager.commit()
    _post(room, ["m0", "m1", "m2"])
    manager.begin()
    user.own_markers().mark(room, room.last_key)  # read 3 of them
    manager.commit()
    _post(room, [f"m{i}" for i in range(3, 20)])  # 17 more; the room keeps 5
    manager.begin()
    assert (room._clock.posted, len(room)) == (20, 5)
    markers = user.markers
    assert markers is not None
    # 17 arrived since; retention removed 12 of them before alice read them.
    assert (markers.unread_count(room), markers.lost(room)) == (5, 12)
    assert [m.text for m in markers.unread(room)] == ["m15", "m16", "m17", "m18", "m19"]
    # A marker above everything removed loses nothing.
    markers.mark(room, markers.unread(room)[1])
    assert (markers.unread_count(room), markers.lost(room)) == (3, 0)
    manager.abort()
    connection.close()


def test_marking_an_older_key_counts_what_is_above_it(db):
    manager, connection, root = _open(db)
    room = root.room("general")
    manager.commit()
    _post(room, [f"m{i}" for i in range(10)])
    manager.begin()
    markers = ReadMarkers()
    messages = room.messages_after(0)
    assert markers.mark(room, messages[3]) is True
    assert markers.position(room) == 4
    assert markers.unread_count(room) == 6
    assert markers.mark("general", messages[8].key) is True  # by name: no position
    assert markers.position(room) is None
    assert markers.unread_count(room) == 1  # counted by a range search instead
    manager.abort()
    connection.close()


def _two_views(
    db: ZODB.DB,
) -> list[tuple[transaction.TransactionManager, Connection, ChatRoot]]:
    manager, connection, root = _open(db)
    for name in ("a", "b"):
        _ = root.room(name)
    user = root.user("alice")
    user.own_markers()
    manager.commit()
    for name in ("a", "b"):
        _post(root.rooms[name], [f"{name}{i}" for i in range(5)])
    connection.close()
    views = []
    for _ in range(2):
        view_manager, view, view_root = _open(db)
        views.append((view_manager, view, view_root))
    return views


def test_two_connections_merge_markers_and_their_positions(file_db):
    (m1, c1, r1), (m2, c2, r2) = _two_views(file_db)
    a1, b2 = r1.rooms["a"], r2.rooms["b"]
    r1.users["alice"].markers.mark(a1, a1.messages_after(0)[1])  # a at 2
    r2.users["alice"].markers.mark(b2, b2.last_key)  # b at 5
    a2 = r2.rooms["a"]
    r2.users["alice"].markers.mark(a2, a2.messages_after(0)[3])  # a at 4: larger wins
    m1.commit()
    m2.commit()  # conflicts on the markers; resolution merges, no retry
    c1.close()
    c2.close()
    manager, connection, root = _open(file_db)
    markers, rooms = root.users["alice"].markers, root.rooms
    assert (markers.position(rooms["a"]), markers.position(rooms["b"])) == (4, 5)
    assert (markers.unread_count(rooms["a"]), markers.unread_count(rooms["b"])) == (1, 0)
    manager.abort()
    connection.close()


def test_marker_resolution_refuses_hostile_positions():
    markers = ReadMarkers()
    good = {"_keys": {"a": 1}, "_positions": {"a": 1}}
    with pytest.raises(ConflictError):
        markers._p_resolveConflict(good, good, {"_keys": {"a": 2}, "_positions": {"a": "x"}})
    with pytest.raises(ConflictError):
        markers._p_resolveConflict(good, {"_keys": {"a": 2}, "_positions": [1]}, good)


def test_clock_total_merges_in_conflict_resolution_with_old_states():
    clock = RoomClock()
    entry = lambda key: (key, (f"id{key}", "bob", "t", 0))  # noqa: E731
    # Old code wrote no total: a state without it counts `count`.
    old: dict[str, Any] = {
        "head": 10, "count": 3, "flushed": 0, "pending": (entry(8), entry(9), entry(10))
    }
    committed = {**old, "head": 11, "count": 4, "pending": (*old["pending"], entry(11))}
    new = {**old, "head": 11, "count": 4, "total": 4, "pending": (*old["pending"], entry(11))}
    resolved = clock._p_resolveConflict(old, committed, new)
    assert (resolved["count"], resolved["total"], resolved["head"]) == (5, 5, 12)


# -- joined rooms, catch-up, marker writes ------------------------------------------


def test_joined_rooms_are_remembered_and_catch_up_counts_what_came_since(db):
    clock = Clock()
    alice = ChatClient(db, "alice", clock=clock)
    for name in ("general", "random", "dev"):
        alice.join(name, remember=True)
    alice.part("dev")
    bob = ChatClient(db, "bob", clock=clock)
    bob.join("random")
    bob.send("before alice reads")
    alice.receive_all()
    seen = alice.open_rooms["random"].last_key
    alice.mark_read("random", seen)
    alice.close()  # writes the marker
    for index in range(3):
        bob.send(f"while away {index} @alice" if index == 1 else f"while away {index}")
    bob.close()

    again = ChatClient(db, "alice", clock=clock)
    assert again.joined_rooms() == ["general", "random"]
    for name in again.joined_rooms():
        again.join(name, history=0, remember=True)
    caught = again.catch_up("random")
    assert (caught.unread, caught.lost) == (3, 0)
    assert next(m.text for m in caught.messages) == "while away 0"
    assert again.catch_up("general").unread == 0
    (general, random) = again.unread()
    assert (random.room, random.unread, random.mentions) == ("random", 3, 1)
    assert general.unread == 0
    assert [m.text for m in again.mentions()] == ["while away 1 @alice"]
    again.close()


def test_marks_are_written_at_a_bounded_rate_and_never_move_back(db):
    alice = ChatClient(db, "alice")
    alice.join("general", remember=True)
    room = alice.open_rooms["general"]
    keys = [alice.send(f"m{i}").key for i in range(5)]
    before = db.storage.lastTransaction()
    alice.mark_read("general", keys[0])
    assert alice.flush_marks() is True  # the first write is due at once
    written = db.storage.lastTransaction()
    assert written != before
    for key in keys[1:]:
        alice.mark_read("general", key)
        assert alice.flush_marks() is False, f"a second write within {MARK_EVERY}s"
    assert db.storage.lastTransaction() == written
    assert alice.flush_marks(force=True) is True  # switching, parting, leaving
    alice.mark_read("general", keys[1])  # older than the written marker
    alice.flush_marks(force=True)
    manager, connection, root = _open(db)
    assert root.users["alice"].markers.get(room.name) == keys[-1]
    manager.abort()
    connection.close()
    alice.close()


def test_a_first_join_starts_with_nothing_unread(db):
    bob = ChatClient(db, "bob")
    bob.join("general")
    bob.send("old news")
    alice = ChatClient(db, "alice")
    alice.join("general", remember=True)
    assert alice.catch_up("general").unread == 0
    assert [r.unread for r in alice.unread()] == [0]
    for client in (alice, bob):
        client.close()


# -- mentions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hi @alice", True),
        ("@ALICE look", True),
        ("thanks @alice.", True),
        ("alice: ping", True),
        ("  alice, ping", True),
        ("hi @alicex", False),
        ("hi @alice.x", False),
        ("mail alice@example.org", False),
        ("hi alice", False),
        ("bob: alice: later", False),
    ],
)
def test_mentions(text, expected):
    assert mentions(Message("id", "r", 1, "bob", text), "alice") is expected


def test_own_messages_mention_nobody_and_latest_mentions_spans_rooms(db):
    manager, connection, root = _open(db)
    first, second = root.room("one"), root.room("two")
    manager.commit()
    first.add_message("@alice in one", "bob")
    second.add_message("me, @alice", "alice")
    second.add_message("alice: in two", "carol")
    manager.begin()
    found = latest_mentions([first, second], "alice")
    assert [m.text for m in found] == ["@alice in one", "alice: in two"]
    assert [m.text for m in latest_mentions([first, second], "alice", limit=1)] == [
        "alice: in two"
    ]
    manager.abort()
    connection.close()


# -- topics --------------------------------------------------------------------------


def test_topic_is_stored_with_who_set_it_and_checked(db):
    alice = ChatClient(db, "alice", clock=Clock())
    alice.join("general")
    assert alice.topic() is None
    alice.set_topic("release on Friday")
    text, by, _ = alice.topic() or (None, None, None)
    assert (text, by) == ("release on Friday", "alice")
    for bad in ("two\nlines", "x" * 400, "bell\x07"):
        with pytest.raises(InvalidInput):
            alice.set_topic(bad)
    alice.set_topic("")
    assert (alice.topic() or ())[:2] == ("", "alice")
    alice.close()


# -- stored files written before these existed ----------------------------------------


def test_a_file_written_before_markers_joined_rooms_topics_and_totals_loads(tmp_path):
    """States as the earlier code pickled them (no ``joined``/``markers`` on a User,
    no ``total`` on a clock, no ``topic`` on a room, no ``_positions`` on markers)
    load with defaults, count, and migrate on their next write."""
    path = str(tmp_path / "old.fs")
    db = ZODB.DB(FileStorage(path))
    manager, connection, root = _open(db)
    room, user = root.room("general"), root.user("alice")
    manager.commit()
    _post(room, [f"m{i}" for i in range(4)])
    manager.begin()
    room._clock._p_activate()
    del room._clock.__dict__["total"]
    room._clock._p_changed = True
    bare = root.user("carol")
    assert "joined" not in bare.__dict__ and "markers" not in bare.__dict__
    assert "topic" not in room.__dict__
    legacy = ReadMarkers()  # as the embed branch's first ReadMarkers stored it
    legacy._keys["general"] = room.messages_after(0)[1].key
    del legacy.__dict__["_positions"]
    user.markers = legacy
    manager.commit()
    connection.close()
    db.close()

    db = ZODB.DB(FileStorage(path))
    manager, connection, root = _open(db)
    room, user, bare = root.rooms["general"], root.users["alice"], root.users["carol"]
    assert (bare.joined, bare.markers, room.topic) == ((), None, None)
    assert room._clock.posted == 4 and room._clock.total is None
    assert unread_rooms(root, "carol") == []
    assert user.markers.position(room) is None and user.markers.unread_count(room) == 2
    manager.abort()
    room.add_message("new", "bob")  # the first post under new code sets the total
    manager.begin()
    assert room._clock.total == 5
    bare.join("general")
    bare.markers.mark(room, room.last_key)
    manager.commit()
    manager.begin()
    assert room_unread(bare, room).unread == 0
    manager.abort()
    connection.close()
    db.close()
