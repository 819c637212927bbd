"""Embedding in an application: readers that keep no state, read markers, events after commit.

In-process databases (MappingStorage, and FileStorage where conflicts must resolve);
`tests/test_watch.py` covers the cross-process watch on a real server.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.Connection import Connection
from ZODB.POSException import ConflictError

import chatzeo
from chatzeo import ChatSession, Message, ReadMarkers, get_root
from chatzeo.session import FLUSH


def _room(
    db: ZODB.DB, name: str = "general"
) -> tuple[transaction.TransactionManager, Connection, ChatSession]:
    """A committed room, and the explicit transaction manager of its connection."""
    manager = transaction.TransactionManager(explicit=True)
    connection = db.open(transaction_manager=manager)
    manager.begin()
    session = get_root(connection).room(name)
    manager.commit()
    return manager, connection, session


# -- readers that keep no state -------------------------------------------------


def test_messages_after_gives_the_same_answer_on_every_pooled_connection(db):
    """The issue's case: user A's request reads, user B's next request gets the same
    pooled connection. new_messages() would give B nothing; messages_after does not care."""
    manager, connection, room = _room(db)
    posted = [room.add_message(f"m{index}", "alice") for index in range(3)]
    manager.begin()
    connection.close()

    for _ in range(2):  # two "requests", each with whatever connection the pool hands out
        request = db.open()
        session = get_root(request).rooms["general"]
        assert [m.id for m in session.messages_after(0)] == [m.id for m in posted]
        assert [m.text for m in session.messages_after(posted[0].key)] == ["m1", "m2"]
        assert session.messages_after(posted[-1]) == []
        assert session.last_key == posted[-1].key
        transaction.abort()
        request.close()


def test_messages_after_pages_with_limit_across_tree_and_pending(db):
    manager, connection, room = _room(db)
    manager.begin()
    for index in range(3 * FLUSH):
        room.post(f"m{index}", "alice")
        manager.commit()
        manager.begin()
    assert room._messages, "some messages moved into the tree"
    seen: list[str] = []
    key = 0
    while True:
        page = room.messages_after(key, limit=7)
        if not page:
            break
        assert len(page) <= 7
        seen.extend(m.text for m in page)
        key = page[-1].key
    assert seen == [f"m{index}" for index in range(3 * FLUSH)]
    assert room.messages_after(0, limit=0) == []
    manager.abort()
    connection.close()


@pytest.mark.parametrize(
    ("key", "limit", "error"),
    [("12", None, TypeError), (True, None, TypeError), (1.5, None, TypeError),
     (-1, None, ValueError), (0, -1, ValueError)],
)
def test_messages_after_refuses_bad_keys_and_limits(db, key, limit, error):
    manager, connection, room = _room(db)
    manager.begin()
    with pytest.raises(error):
        room.messages_after(key, limit=limit)
    manager.abort()
    connection.close()


def test_a_key_beyond_the_tree_range_is_harmless(db):
    # Keys arrive from URLs and Last-Event-ID headers; one past 2**63 must not reach the
    # LOBTree (OverflowError) but simply mean "nothing after it".
    manager, connection, room = _room(db)
    room.add_message("hi", "alice")
    manager.begin()
    assert room.messages_after(2**80) == []
    manager.abort()
    connection.close()


def test_readers_work_on_a_room_stored_before_pending_existed(file_db):
    """A room written by the first code (messages only in the tree; a clock without
    ``pending`` or ``flushed``) reads the same through the new readers."""
    manager, connection, room = _room(file_db)
    manager.begin()
    records = [(1_000 + index, (f"id{index}", "alice", f"old{index}", 0)) for index in range(5)]
    for key, record in records:
        room._messages[key] = record
    room._clock.__setstate__({"head": records[-1][0], "count": len(records)})  # the old state
    room._clock._p_changed = True
    manager.commit()
    connection.close()
    file_db.cacheMinimize()

    fresh = file_db.open()
    session = get_root(fresh).rooms["general"]
    assert "pending" not in session._clock.__dict__
    assert [m.text for m in session.messages_after(1_001)] == ["old2", "old3", "old4"]
    assert session.find_message("id3").text == "old3"
    transaction.abort()
    fresh.close()


def test_find_message_finds_by_id_from_a_key(db):
    manager, connection, room = _room(db)
    first = room.add_message("one", "alice")
    second = room.add_message("two", "bob")
    manager.begin()
    assert room.find_message(second.id, from_key=second.key) == second
    assert room.find_message(first.id, from_key=second.key) is None
    assert room.find_message("nope") is None
    manager.abort()
    connection.close()


# -- read markers ---------------------------------------------------------------


def test_markers_move_only_forward_and_write_only_when_they_move(db):
    manager, connection, room = _room(db)
    messages = [room.add_message(f"m{index}", "alice") for index in range(4)]
    manager.begin()
    root = connection.root()
    root["alice"] = PersistentMapping(markers=ReadMarkers())
    manager.commit()

    manager.begin()
    markers = root["alice"]["markers"]
    assert markers.get(room) == 0
    assert [m.text for m in markers.unread(room)] == ["m0", "m1", "m2", "m3"]
    assert markers.mark(room, messages[1]) is True
    assert markers.mark("general", messages[0].key) is False  # never back
    manager.commit()

    manager.begin()
    assert markers.mark(room, messages[1]) is False
    assert markers._p_changed is False, "an unchanged marker is not written"
    assert [m.text for m in markers.unread(room)] == ["m2", "m3"]
    assert markers.has_unread(room)
    assert markers.mark_all_read(room) is True
    assert not markers.has_unread(room)
    assert markers.rooms() == ["general"]
    assert markers.forget(room) is True and markers.forget(room) is False
    with pytest.raises(TypeError):
        markers.mark(room, "12")
    with pytest.raises(ValueError):
        markers.mark(room, -3)
    manager.abort()
    connection.close()


def _markers_in_two_connections(db: ZODB.DB) -> Any:
    """Two connections (two tabs of one user) holding the same committed ReadMarkers."""
    setup = transaction.TransactionManager(explicit=True)
    connection = db.open(transaction_manager=setup)
    setup.begin()
    connection.root()["markers"] = markers = ReadMarkers()
    markers.mark("a", 10)
    markers.mark("b", 10)
    markers.mark("gone", 5)
    setup.commit()
    connection.close()
    views = []
    for _ in range(2):
        manager = transaction.TransactionManager(explicit=True)
        view = db.open(transaction_manager=manager)
        manager.begin()
        views.append((manager, view, view.root()["markers"]))
    return views


def test_concurrent_marks_merge_and_the_larger_key_wins(file_db):
    (m1, c1, first), (m2, c2, second) = _markers_in_two_connections(file_db)
    first.mark("a", 30)
    first.mark("c", 7)
    first.forget("gone")
    second.mark("a", 20)  # smaller: loses
    second.mark("b", 40)  # only this side: kept
    m1.commit()
    m2.commit()  # would be a ConflictError without resolution
    m1.begin()
    assert first._keys == {"a": 30, "b": 40, "c": 7}
    m1.abort()
    c1.close()
    c2.close()


def test_a_marker_moved_on_one_side_survives_a_forget_on_the_other(file_db):
    (m1, c1, first), (m2, c2, second) = _markers_in_two_connections(file_db)
    first.forget("a")
    second.mark("a", 99)
    m1.commit()
    m2.commit()
    m1.begin()
    assert first.get("a") == 99
    m1.abort()
    c1.close()
    c2.close()


def test_a_malformed_marker_state_is_refused_in_resolution():
    markers = ReadMarkers()
    good = {"_keys": {"a": 1}}
    with pytest.raises(ConflictError):
        markers._p_resolveConflict(good, {"_keys": {"a": "1; rm -rf"}}, good)
    with pytest.raises(ConflictError):
        markers._p_resolveConflict(good, good, {"_keys": [("a", 1)]})


# -- events after commit --------------------------------------------------------


@pytest.fixture
def heard() -> Iterator[list[chatzeo.MessagePosted]]:
    events: list[chatzeo.MessagePosted] = []
    unsubscribe = chatzeo.subscribe(events.append)
    yield events
    unsubscribe()


def test_subscribers_hear_a_post_only_after_its_commit(db, heard):
    manager, connection, room = _room(db)
    manager.begin()
    room.post("first", "alice")
    assert heard == [], "nothing before the commit"
    manager.commit()
    assert [event.message.text for event in heard] == ["first"]
    event = heard[0]
    assert event.room == "general" and event.room_oid == room._p_oid
    assert event.database is db
    assert event.stored_message().id == event.message.id
    connection.close()


def test_a_post_made_before_anyone_subscribed_is_not_announced(db):
    manager, connection, room = _room(db)
    manager.begin()
    room.post("unheard", "alice")
    events: list[chatzeo.MessagePosted] = []
    unsubscribe = chatzeo.subscribe(events.append)
    try:
        manager.commit()
        room.add_message("heard", "alice")
    finally:
        unsubscribe()
    assert [event.message.text for event in events] == ["heard"]
    connection.close()


def test_an_aborted_or_failed_transaction_tells_nobody(file_db, heard):
    manager, connection, room = _room(file_db)
    manager.begin()
    room.post("never", "alice")
    manager.abort()

    # A commit that fails: another connection changed the same plain object first.
    manager.begin()
    connection.root()["counter"] = PersistentMapping(n=0)
    manager.commit()
    other_manager = transaction.TransactionManager(explicit=True)
    other = file_db.open(transaction_manager=other_manager)
    other_manager.begin()
    other.root()["counter"]["n"] = 1
    manager.begin()
    connection.root()["counter"]["n"] = 2
    room.post("loses the race", "alice")
    other_manager.commit()
    with pytest.raises(ConflictError):
        manager.commit()
    manager.abort()
    assert heard == []
    other.close()
    connection.close()


def test_a_rolled_back_savepoint_forgets_the_posts_after_it(db, heard):
    manager, connection, room = _room(db)
    manager.begin()
    room.post("kept", "alice")
    savepoint = manager.savepoint()
    room.post("rolled back", "alice")
    savepoint.rollback()
    room.post("also kept", "alice")
    manager.commit()
    assert [event.message.text for event in heard] == ["kept", "also kept"]
    manager.begin()
    assert [m.text for m in room.messages_after(0)] == ["kept", "also kept"]
    manager.abort()
    connection.close()


def test_add_message_is_heard_once_even_when_it_retried(file_db, heard):
    _manager, connection, room = _room(file_db)
    sent = room.add_message("hello", "alice")
    assert [event.message.id for event in heard] == [sent.id]
    connection.close()


def test_a_session_created_and_posted_to_in_one_transaction_is_heard(db, heard):
    # The app's own graph, the default (thread-local) transaction manager: pyramid_tm's.
    connection = db.open()
    ticket = connection.root()["ticket"] = PersistentMapping()
    ticket["discussion"] = discussion = ChatSession("ticket-1")
    discussion.post("opened", "alice")
    transaction.commit()
    assert [(e.message.text, e.room_oid) for e in heard] == [("opened", discussion._p_oid)]
    connection.close()


def test_a_failing_subscriber_neither_undoes_the_commit_nor_silences_the_others(db, heard):
    def broken(event: chatzeo.MessagePosted) -> None:
        raise RuntimeError("subscriber bug")

    unsubscribe = chatzeo.subscribe(broken)
    later: list[Message] = []
    unsubscribe_later = chatzeo.subscribe(lambda event: later.append(event.message))
    try:
        manager, connection, room = _room(db)
        sent = room.add_message("still stored", "alice")
        assert [m.id for m in later] == [sent.id] and len(heard) == 1
        manager.begin()
        assert room.messages_after(0) == [sent]
        manager.abort()
        connection.close()
    finally:
        unsubscribe()
        unsubscribe_later()


def test_zope_event_subscribers_receive_the_event(db):
    zope_event = pytest.importorskip("zope.event", reason="zope.event is in the test extra")
    received: list[object] = []
    zope_event.subscribers.append(received.append)
    try:
        _manager, connection, room = _room(db)
        sent = room.add_message("hi", "alice")
        assert [getattr(event, "message", None) for event in received] == [sent]
        assert chatzeo.IMessagePosted.providedBy(received[0])
        connection.close()
    finally:
        zope_event.subscribers.remove(received.append)


def test_subscribers_run_in_the_committing_thread(db, heard):
    _manager, connection, room = _room(db)
    threads: list[str] = []
    unsubscribe = chatzeo.subscribe(lambda event: threads.append(threading.current_thread().name))
    try:
        worker = threading.Thread(target=lambda: room.add_message("x", "alice"), name="poster")
        worker.start()
        worker.join(30)
        assert threads == ["poster"]
    finally:
        unsubscribe()
        connection.close()


def test_the_embedding_docs_first_example_runs(capsys):
    import re

    from support import REPO

    text = (REPO / "docs" / "embedding.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    exec(compile(block, "docs/embedding.md", "exec"), {})
    assert capsys.readouterr().out.splitlines() == [
        "[('ann', 'First draft is up'), ('bob', 'Looks good')]"
    ]
