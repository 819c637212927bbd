"""`ReadMarkers`: where one user stopped reading, per room, stored in the database.

An application keeps one `ReadMarkers` on each of its own user objects (not on the
room: readers then never write what writers write). For each room name it holds the
key of the last message that user read; `ChatSession.messages_after` of that key is
what is unread. Room names key it, so give the rooms of one user distinct names.

Several connections of one user (two browser tabs, a terminal and a phone) may mark
at once. Both commits write this object; `ReadMarkers._p_resolveConflict` merges them
room by room instead of refusing one: the larger key wins (a marker only ever moves
forward), a marker only one side changed keeps that change, and a marker one side
dropped stays dropped unless the other moved it. The resolution runs where ZODB
resolves conflicts (on the ZEO server, in a RelStorage client) on plain states: a
dict of ``str -> int``; any other state is refused with `ConflictError`.

`mark` writes only when the marker moves, so reading what was already read costs no
commit; how often to mark (on leaving a room, every few seconds at most) is the
application's choice (chatzeo's own clients: `chatzeo.client.ChatClient.mark_read`).
chatzeo's realm keeps one on each `chatzeo.realm.User`.

Counting without scanning
    Beside each key the marker keeps the room's *position* there: how many messages
    had ever been posted to the room up to and including that key
    (`chatzeo.session.RoomClock.posted`). The room clock knows how many were ever
    posted and how many it still holds, so `unread_count` and `lost` are arithmetic
    on one small record, whatever the room's size, and retention is accounted for:
    the ``posted - count`` oldest messages are gone, and those among them above the
    marker were lost to it before they were read. A marker stored without a position
    (an older `ReadMarkers`, or a key marked for a room given by name) counts by a
    range search of what is unread instead.

Belongs to the thread of the connection it was loaded from, like any persistent object.
"""

from __future__ import annotations

from typing import Any

from persistent import Persistent
from ZODB.POSException import ConflictError

from .message import Message

__all__ = ["ReadMarkers"]

Room = Any  # a ChatSession or a room name


class ReadMarkers(Persistent):
    """See `IReadMarkers`."""

    # Markers stored before positions existed load without them. Never changed in
    # place: `mark` gives the instance a dict of its own.
    _positions: dict[str, int] = {}  # noqa: RUF012 (replaced, never mutated)

    def __init__(self) -> None:
        # room name -> key of the last message read. A plain dict in this object's own
        # record, so that conflict resolution sees all of it.
        self._keys: dict[str, int] = {}
        # room name -> the room's `posted` count at that key (see "Counting").
        self._positions: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<ReadMarkers for {len(self._keys)} rooms>"

    def get(self, room: Room) -> int:
        """See `IReadMarkers`."""
        return self._keys.get(_name(room), 0)

    def mark(self, room: Room, key: int | Message) -> bool:
        """See `IReadMarkers`."""
        key = _key(key)
        name = _name(room)
        current = self._keys.get(name)
        # A first mark may be 0 (an empty room joined): it still records the position.
        if current is not None and key <= current:
            return False
        self._keys[name] = key
        positions = dict(self._positions)
        position = None if isinstance(room, str) else _position(room, key)
        if position is None:
            positions.pop(name, None)
        else:
            positions[name] = position
        self._positions = positions
        self._p_changed = True  # a plain dict: persistent does not see inside it
        return True

    def __contains__(self, room: Room) -> bool:
        """Whether ``room`` (a room or its name) has a marker, even one at key 0."""
        return _name(room) in self._keys

    def position(self, room: Room) -> int | None:
        """The room's posted count at the marker (see "Counting"), None if unknown."""
        return self._positions.get(_name(room))

    def unread_count(self, room: Any) -> int:
        """How many messages of ``room`` (a `ChatSession`) above the marker it still
        holds. Arithmetic on the room's clock when the marker has a position; else a
        range search of the unread messages."""
        clock = room._clock_or_none()
        position = self._positions.get(room.name)
        if position is None or clock is None:
            return len(room.messages_after(self.get(room)))
        posted = clock.posted
        gone = posted - clock.message_count()  # the oldest, removed by retention
        unread: int = max(0, posted - max(position, gone))
        return unread

    def lost(self, room: Any) -> int:
        """How many messages above the marker retention removed before they were
        read (0 when the marker has no position: they cannot be told apart)."""
        clock = room._clock_or_none()
        position = self._positions.get(room.name)
        if position is None or clock is None:
            return 0
        lost: int = max(0, clock.posted - clock.message_count() - position)
        return lost

    def mark_all_read(self, room: Any) -> bool:
        """See `IReadMarkers`."""
        return self.mark(room, room.last_key)

    def forget(self, room: Room) -> bool:
        """See `IReadMarkers`."""
        name = _name(room)
        if name not in self._keys:
            return False
        del self._keys[name]
        if name in self._positions:
            positions = dict(self._positions)
            del positions[name]
            self._positions = positions
        self._p_changed = True
        return True

    def unread(self, room: Any, *, limit: int | None = None) -> list[Message]:
        """See `IReadMarkers`."""
        messages: list[Message] = room.messages_after(self.get(room), limit=limit)
        return messages

    def has_unread(self, room: Any) -> bool:
        """See `IReadMarkers`."""
        return bool(room.last_key > self.get(room))

    def rooms(self) -> list[str]:
        """See `IReadMarkers`."""
        return sorted(self._keys)

    def _p_resolveConflict(  # noqa: N802 (ZODB's name)
        self, old: dict[str, Any], committed: dict[str, Any], new: dict[str, Any]
    ) -> dict[str, Any]:
        old_keys, committed_keys, new_keys = (_keys_of(state) for state in (old, committed, new))
        committed_positions, new_positions = (
            _keys_of(state, "_positions") for state in (committed, new)
        )
        merged: dict[str, int] = {}
        positions: dict[str, int] = {}
        for name in committed_keys.keys() | new_keys.keys():
            before = old_keys.get(name)
            theirs, ours = committed_keys.get(name), new_keys.get(name)
            if ours == before:
                value = theirs  # only the committed side touched it (or neither)
            elif theirs == before:
                value = ours
            elif theirs is None or ours is None:
                value = theirs if ours is None else ours  # moved beats dropped
            else:
                value = max(theirs, ours)
            if value is None:
                continue
            merged[name] = value
            # The position goes with the key it was taken at.
            source = new_positions if value == ours else committed_positions
            if name in source:
                positions[name] = source[name]
        resolved = dict(committed)
        resolved["_keys"] = merged
        if positions or "_positions" in committed or "_positions" in new:
            resolved["_positions"] = positions
        return resolved


def _keys_of(state: dict[str, Any], attribute: str = "_keys") -> dict[str, int]:
    keys = state.get(attribute, {}) if isinstance(state, dict) else None
    if not isinstance(keys, dict) or not all(
        isinstance(name, str) and type(key) is int for name, key in keys.items()
    ):
        raise ConflictError("read markers hold something other than room names and keys")
    return keys


def _position(room: Any, key: int) -> int | None:
    """``room``'s posted count at ``key``: the clock's count minus the messages above
    ``key`` (none in the usual case of marking the newest). None for an object that
    is not a chatzeo room."""
    clock = room._clock_or_none() if hasattr(room, "_clock_or_none") else None
    if clock is None:
        return None
    if key >= clock.newest_key():
        return int(clock.posted)
    return int(clock.posted) - len(room.messages_after(key))


def _name(room: Room) -> str:
    if isinstance(room, str):
        return room
    name = getattr(room, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"a room or a room name, not {type(room).__name__}")
    return name


def _key(key: int | Message) -> int:
    if isinstance(key, Message):
        return key.key
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"a message key is an int, not {type(key).__name__}")
    if key < 0:
        raise ValueError(f"a message key is >= 0, not {key}")
    return key
