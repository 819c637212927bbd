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
application's choice. Not linked into chatzeo's own realm (`chatzeo.realm.User`) yet.

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

    def __init__(self) -> None:
        # room name -> key of the last message read. A plain dict in this object's own
        # record, so that conflict resolution sees all of it.
        self._keys: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<ReadMarkers for {len(self._keys)} rooms>"

    def get(self, room: Room) -> int:
        """See `IReadMarkers`."""
        return self._keys.get(_name(room), 0)

    def mark(self, room: Room, key: int | Message) -> bool:
        """See `IReadMarkers`."""
        key = _key(key)
        name = _name(room)
        if key <= self._keys.get(name, 0):
            return False
        self._keys[name] = key
        self._p_changed = True  # a plain dict: persistent does not see inside it
        return True

    def mark_all_read(self, room: Any) -> bool:
        """See `IReadMarkers`."""
        return self.mark(room, room.last_key)

    def forget(self, room: Room) -> bool:
        """See `IReadMarkers`."""
        name = _name(room)
        if name not in self._keys:
            return False
        del self._keys[name]
        self._p_changed = True
        return True

    def unread(self, room: Any, *, limit: int | None = None) -> list[Message]:
        """See `IReadMarkers`."""
        return room.messages_after(self.get(room), limit=limit)

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
        merged: dict[str, int] = {}
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
            if value is not None:
                merged[name] = value
        resolved = dict(committed)
        resolved["_keys"] = merged
        return resolved


def _keys_of(state: dict[str, Any]) -> dict[str, int]:
    keys = state.get("_keys", {}) if isinstance(state, dict) else None
    if not isinstance(keys, dict) or not all(
        isinstance(name, str) and type(key) is int for name, key in keys.items()
    ):
        raise ConflictError("read markers hold something other than room names and keys")
    return keys


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
