"""Rooms, users, connection counting and presence leases."""

from __future__ import annotations

import pytest
import transaction
import ZODB
from ZODB.MappingStorage import MappingStorage

from chatzeo import ChatClient, TooManyConnections, get_root


class FakeClock:
    def __init__(self, now: float = 1_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db():
    database = ZODB.DB(MappingStorage())
    yield database
    database.close()


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
    clock.now += 45
    alice.heartbeat()
    assert alice.who("random") == ["bob"]
    clock.now += 30
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
    clock.now += 61
    ChatClient(db, "carol", clock=clock).close()


def test_heartbeat_reacquires_a_lapsed_lease(db):
    clock = FakeClock()
    dave = ChatClient(db, "dave", clock=clock)
    dave.join("general")
    clock.now += 120
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
