"""Rooms, users, connection counting and presence leases."""

from __future__ import annotations

import pytest
import transaction
import ZODB

from chatzeo import ChatClient, TooManyConnections, get_root


class FakeClock:
    def __init__(self, now: float = 1_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _lease(db: ZODB.DB) -> float:
    connection = db.open()
    try:
        return get_root(connection).lease_seconds
    finally:
        transaction.abort()
        connection.close()


def test_one_user_object_however_many_connections(db):
    clock = FakeClock()
    first, second = ChatClient(db, "alice", clock=clock), ChatClient(db, "alice", clock=clock)
    first.join("general")
    second.join("general")
    connection = db.open()
    users = get_root(connection).users
    assert list(users) == ["alice"]
    assert users["alice"].connections(clock()) == 2
    connection.close()
    for client in (first, second):
        client.close()


def test_connection_limit_refuses_the_next_one_and_counts_out_on_close(db):
    clock = FakeClock()
    connection = db.open()
    get_root(connection).max_connections = 2
    transaction.commit()
    connection.close()
    clients = [ChatClient(db, "bob", clock=clock) for _ in range(2)]
    with pytest.raises(TooManyConnections, match="bob"):
        ChatClient(db, "bob", clock=clock)
    clients.pop().close()
    clients.append(ChatClient(db, "bob", clock=clock))
    for client in clients:
        client.close()


def test_who_lists_present_users_and_forgets_crashed_ones(db):
    clock = FakeClock()
    alice, bob = ChatClient(db, "alice", clock=clock), ChatClient(db, "bob", clock=clock)
    alice.join("general")
    bob.join("general")
    assert alice.who() == ["alice", "bob"]
    bob.join("random")  # joining adds a room: bob is present in both now
    assert alice.who() == ["alice", "bob"]
    bob.part("general")
    assert alice.who() == ["alice"]
    assert alice.who("random") == ["bob"]
    # Bob's process dies: no close(), no more heartbeats. Alice keeps renewing.
    lease = _lease(db)
    clock.now += lease * 0.75
    alice.heartbeat()
    assert alice.who("random") == ["bob"]
    clock.now += lease * 0.5
    assert alice.who("random") == []
    assert alice.who() == ["alice"]
    alice.close()
    assert bob.who("general") == []


def test_an_expired_lease_no_longer_counts_against_the_limit(db):
    clock = FakeClock()
    connection = db.open()
    get_root(connection).max_connections = 1
    transaction.commit()
    connection.close()
    ChatClient(db, "carol", clock=clock)  # crashes: never closed
    with pytest.raises(TooManyConnections):
        ChatClient(db, "carol", clock=clock)
    clock.now += _lease(db) + 1
    ChatClient(db, "carol", clock=clock).close()


def test_heartbeat_reacquires_a_lapsed_lease(db):
    clock = FakeClock()
    dave = ChatClient(db, "dave", clock=clock)
    dave.join("general")
    clock.now += _lease(db) * 2
    assert dave.who() == []
    dave.heartbeat()
    assert dave.who() == ["dave"]
    dave.close()


def test_rooms_are_created_once_and_listed_with_counts(db):
    reader = ChatClient(db)
    reader.join("b-room")
    reader.send("hello")
    reader.join("a-room")
    assert reader.rooms() == [("a-room", 0), ("b-room", 1)]
    reader.close()


def test_heartbeats_write_only_their_own_lease_and_rarely(db):
    # Presence must cost little: a renewal never writes the room (everyone in it
    # holds that), and most heartbeats write nothing at all.
    clock = FakeClock()
    erin = ChatClient(db, "erin", clock=clock)
    erin.join("general")
    storage = db.storage
    lease = _lease(db)
    commits = []
    for _ in range(20):  # a heartbeat every 5% of the lease
        before = storage.lastTransaction()
        clock.now += lease / 20
        erin.heartbeat()
        if storage.lastTransaction() != before:
            commits.append(clock.now)
    assert 1 <= len(commits) <= 3, commits
    connection = db.open()
    try:
        room = get_root(connection).rooms["general"]
        user = get_root(connection).users["erin"]
        assert room.presence._p_serial < user.leases._p_serial  # the room was not rewritten
    finally:
        transaction.abort()
        connection.close()
    assert erin.who() == ["erin"]
    erin.close()
