"""ChatSession on an in-process database: keys, cursors, transactions, paging, retention."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from functools import partial

import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import ConflictError

from chatzeo import (
    ChatSession,
    InvalidInput,
    InvalidMessage,
    InvalidName,
    Message,
    NotInDatabase,
    RetryLimitExceeded,
    RetryPolicy,
    get_root,
    run_in_transaction,
)
from chatzeo.session import RoomClock


@pytest.fixture
def room(db: ZODB.DB) -> Iterator[ChatSession]:
    """A committed room in the default transaction manager's connection."""
    connection = db.open()
    session = get_root(connection).room("general")
    transaction.commit()
    yield session
    transaction.abort()
    connection.close()


def test_message_is_an_immutable_record_whose_str_is_its_text():
    message = Message("abc", "general", 1_700_000_000_250_000, "alice", "hi there")
    assert str(message) == "hi there"
    assert message.time == pytest.approx(1_700_000_000.25)
    with pytest.raises(AttributeError):
        message.text = "changed"  # type: ignore[misc]


def test_add_message_commits_and_new_messages_returns_it_once(room):
    sent = room.add_message("hello", "alice")
    transaction.begin()
    received = room.new_messages()
    assert [m.id for m in received] == [sent.id]
    assert (received[0].text, received[0].author) == ("hello", "alice")
    assert room.new_messages() == []


def test_first_call_returns_the_whole_history_oldest_first(room):
    for index in range(150):
        room.post(f"m{index}", "bob")
    transaction.commit()
    assert [m.text for m in room.new_messages()] == [f"m{i}" for i in range(150)]
    assert len(room) == 150


def test_cursor_survives_ghosting_without_replay_or_skip(db, room):
    for index in range(100):
        room.post(f"old{index}")
    transaction.commit()
    assert len(room.new_messages()) == 100
    room._p_jar.cacheMinimize()
    assert room._p_status == "ghost"
    assert room.new_messages() == []
    room.add_message("fresh")
    transaction.begin()
    room._p_jar.cacheMinimize()
    assert [m.text for m in room.new_messages()] == ["fresh"]


def test_cursor_is_per_connection_and_never_stored(db, room):
    room.add_message("one")
    other = db.open(transaction_manager=transaction.TransactionManager())
    other_room = get_root(other).rooms["general"]
    transaction.begin()
    assert [m.text for m in room.new_messages()] == ["one"]
    assert [m.text for m in other_room.new_messages()] == ["one"]
    assert not any(name.startswith("_v_") for name in room.__getstate__())
    assert b"_v_cursor" not in pickle.dumps(room.__getstate__())
    other.close()


def test_add_message_never_commits_the_callers_other_changes(db, room):
    root = room._p_jar.root()
    root["unrelated"] = "uncommitted"
    room.add_message("posted")
    transaction.abort()
    check = db.open(transaction_manager=transaction.TransactionManager())
    assert "unrelated" not in check.root()
    assert [m.text for m in get_root(check).rooms["general"].history()] == ["posted"]
    check.close()


def test_post_joins_the_callers_transaction_without_committing(db, room):
    room.post("not yet")
    transaction.abort()
    assert room.history() == []
    room.post("now")
    transaction.commit()
    assert [m.text for m in room.history()] == ["now"]


def test_add_message_on_a_session_outside_any_database_is_refused():
    with pytest.raises(NotInDatabase):
        ChatSession("loose").add_message("hi")


def test_keys_grow_in_commit_order_even_when_the_writer_clock_lags(room):
    ahead = room.add_message("from the future", clock=lambda: 2_000_000_000.0)
    behind = room.add_message("from the past", clock=lambda: 1_000_000_000.0)
    assert behind.key == ahead.key + 1
    transaction.begin()
    assert [m.text for m in room.new_messages()] == ["from the future", "from the past"]


def test_room_clock_orders_a_concurrent_append_after_the_committed_one():
    clock = RoomClock()
    a, b, c = ("a", None, "a", 0), ("b", None, "b", 0), ("c", None, "c", 0)
    old = {"head": 10, "count": 1, "pending": ((10, a),)}
    committed = {"head": 20, "count": 2, "pending": ((10, a), (20, b))}
    # The later commit proposed a smaller key: it is raised, never refused.
    assert clock._p_resolveConflict(old, committed, {"head": 15, "count": 2,
                                                     "pending": ((10, a), (15, c))}) == {
        "head": 21, "count": 3, "pending": ((10, a), (20, b), (21, c))}
    # After a commit that moved the pending entries into the tree.
    flushed = {"head": 20, "count": 2, "pending": ()}
    assert clock._p_resolveConflict(old, flushed, {"head": 30, "count": 2,
                                                   "pending": ((10, a), (30, c))}) == {
        "head": 30, "count": 3, "pending": ((30, c),)}


def test_room_clock_orders_a_flush_after_a_post_and_refuses_a_second_flush():
    clock = RoomClock()
    a, b, c, d = (("a", None, t, 0) for t in "abcd")
    old = {"head": 10, "count": 1, "pending": ((10, a),), "flushed": 0}
    appended = {"head": 20, "count": 2, "pending": ((10, a), (20, b)), "flushed": 0}
    # This writer moved (10, a) into the tree and appended its own entry.
    flush = {"head": 15, "count": 2, "pending": ((15, c),), "flushed": 10}
    assert clock._p_resolveConflict(old, appended, flush) == {
        "head": 21, "count": 3, "pending": ((20, b), (21, c)), "flushed": 10}
    # Two writers moved the same entries: the later one retries.
    other = {"head": 12, "count": 2, "pending": ((12, d),), "flushed": 10}
    with pytest.raises(ConflictError):
        clock._p_resolveConflict(old, other, flush)
    # A flush that moved more than what was committed before it is not merged.
    own = {"head": 16, "count": 3, "pending": ((16, d),), "flushed": 15}
    with pytest.raises(ConflictError):
        clock._p_resolveConflict(old, appended, own)


def test_add_message_returns_the_key_conflict_resolution_gave_it(tmp_path):
    """A post commits between another post's key choice and its commit: resolution
    (FileStorage resolves conflicts, as ZEO's server does) raises the later one's key,
    and add_message returns the raised key, the one readers get."""
    database = ZODB.DB(FileStorage(str(tmp_path / "chat.fs")))
    try:
        manager = transaction.TransactionManager()
        connection = database.open(transaction_manager=manager)
        session = get_root(connection).room("race")
        manager.commit()
        other = database.open(transaction_manager=transaction.TransactionManager())
        other_session = other.get(session._p_oid)
        first: list[Message] = []

        def clock_that_lets_another_post_in() -> float:
            if not first:  # only in the first attempt: the other post commits first
                first.append(other_session.add_message("first", clock=lambda: 2e9))
            return 1e9

        retries: list[BaseException] = []
        second = session.add_message("second", clock=clock_that_lets_another_post_in,
                                     policy=RetryPolicy(on_retry=retries.append))
        assert retries == [], "resolved, not retried"
        assert second.key == first[0].key + 1 > 1e9 * 1e6
        manager.begin()
        stored = [(m.text, m.key) for m in session.history()]
        assert stored == [("first", first[0].key), ("second", second.key)]
        other.close()
        connection.close()
    finally:
        database.close()


def test_history_pages_by_point_and_limit(room):
    for index in range(30):
        room.post(f"m{index}", clock=lambda i=index: 1_000.0 + i)
    transaction.commit()
    latest = room.latest(5)
    assert [m.text for m in latest] == [f"m{i}" for i in range(25, 30)]
    older = room.history(before=latest[0], limit=5)
    assert [m.text for m in older] == [f"m{i}" for i in range(20, 25)]
    assert [m.text for m in room.history(since=1_027.0)] == ["m28", "m29"]
    assert [m.text for m in room.history(since=1_010.5, before=1_013.0)] == ["m11", "m12"]
    assert [m.text for m in room.history(since=latest[0], limit=2)] == ["m26", "m27"]
    assert room.latest(0) == []


def test_retention_by_count_and_by_age(db):
    connection = db.open()
    root = get_root(connection)
    capped = root.rooms["capped"] = ChatSession("capped", max_messages=10)
    aged = root.rooms["aged"] = ChatSession("aged", max_age=60)
    for index in range(25):
        capped.post(f"c{index}")
        aged.post(f"a{index}", clock=partial(float, 10_000.0 + index * 10))
    transaction.commit()
    assert [m.text for m in capped.history()] == [f"c{i}" for i in range(15, 25)]
    assert len(capped) == 10
    # The newest is at 10240 s; everything older than 60 s before it is gone.
    assert [m.text for m in aged.history()] == [f"a{i}" for i in range(18, 25)]
    assert len(aged) == 7
    connection.close()


@pytest.mark.parametrize(
    "text",
    ["", "   ", "a\0b", "bell\x07", "esc \x1b[2J", "c1 \x9b", "x" * 4097, "é" * 2049, "\ud800"],
)
def test_bad_text_is_refused_before_anything_is_written(room, text):
    with pytest.raises(InvalidMessage) as caught:
        room.add_message(text)
    assert isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)
    transaction.begin()
    assert room.history() == []


@pytest.mark.parametrize("name", ["", "a b", "-x", "x" * 33, "caf\u00e9", "a/b", 42])
def test_bad_author_is_refused(room, name):
    with pytest.raises(InvalidName):
        room.add_message("hi", name)


def test_bad_room_names_are_refused():
    for name in ["", "two words", "x" * 65, "#", "../etc", "\x1b"]:
        with pytest.raises(InvalidInput):
            ChatSession(name)
    assert ChatSession("#general").name == "general"


def test_retry_is_bounded_and_raises_a_chatzeo_error(db):
    calls = []

    def always_conflicts(connection):
        calls.append(1)
        raise ConflictError("busy")

    with pytest.raises(RetryLimitExceeded) as caught:
        run_in_transaction(
            db, always_conflicts, policy=RetryPolicy(max_attempts=5), sleep=lambda s: None
        )
    assert len(calls) == 5
    assert isinstance(caught.value.last_error, ConflictError)


def test_retry_backoff_is_jittered_and_capped():
    policy = RetryPolicy(base_delay=0.001, max_delay=0.05)
    assert policy.delay(0, rng=lambda: 1.0) == pytest.approx(0.001)
    assert policy.delay(3, rng=lambda: 1.0) == pytest.approx(0.008)
    assert policy.delay(40, rng=lambda: 1.0) == pytest.approx(0.05)
    assert policy.delay(40, rng=lambda: 0.5) == pytest.approx(0.025)


class _CountingStorage(MappingStorage):
    """A MappingStorage that counts the records it loads."""

    loads = 0

    def load(self, oid, version=""):
        _CountingStorage.loads += 1
        return super().load(oid, version)

    def loadBefore(self, oid, tid):  # noqa: N802 (ZODB's name)
        _CountingStorage.loads += 1
        return super().loadBefore(oid, tid)


def _loads_for_reads(size: int) -> tuple[int, int]:
    """Records loaded, from a cold cache, by new_messages() of one message and latest(50)."""
    db = ZODB.DB(_CountingStorage())
    connection = db.open()
    room = get_root(connection).room("big")
    transaction.commit()
    for start in range(0, size, 5_000):
        for index in range(start, min(size, start + 5_000)):
            room.post(f"m{index}")
        transaction.commit()
    room.new_messages()
    room.add_message("one more")
    transaction.begin()
    connection.cacheMinimize()
    _CountingStorage.loads = 0
    assert len(room.new_messages()) == 1
    after_new = _CountingStorage.loads
    connection.cacheMinimize()
    _CountingStorage.loads = 0
    assert len(room.latest(50)) == 50
    after_latest = _CountingStorage.loads
    connection.close()
    db.close()
    return after_new, after_latest


def test_reads_load_a_few_records_whatever_the_history_size():
    small_new, small_latest = _loads_for_reads(1_000)
    big_new, big_latest = _loads_for_reads(100_000)
    # A 100k-message LOBTree is one level deeper than a 1k one; nothing else grows.
    assert big_new <= small_new + 2 and big_new <= 8
    assert big_latest <= small_latest + 2 and big_latest <= 10
