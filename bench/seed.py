"""The seed's chat design (the classic ZEO demo), kept here as the baseline.

Ported to ZODB 6 without changing its design: messages in an ``OOBTree`` keyed by
``time.time()``; `SeedChatSession.add_message` commits the thread's transaction and
sleeps 0.2 s after a conflict; `SeedChatSession.new_messages` scans the whole tree
for keys later than the last one returned; a reader polls it every 0.2 s
(`poll_forever`). Not part of chatzeo: it is only what chatzeo is measured against.

Everything runs in the thread that owns the object's connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import transaction
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.POSException import ConflictError

__all__ = ["SeedChatSession", "POLL_SECONDS", "seed_room", "fill"]

POLL_SECONDS = 0.2
_ROOT_KEY = "bench-seed-rooms"


class SeedChatSession(Persistent):
    """The seed's ChatSession."""

    _v_last_time: float

    def __init__(self, name: str) -> None:
        self.name = name
        self._messages = OOBTree()

    def add_message(self, message: str) -> None:
        """Add a message and commit, retrying after 0.2 s on a conflict (as the seed does)."""
        while True:
            try:
                now = time.time()
                self._messages[now] = message
                transaction.commit()
            except ConflictError:
                # The seed did not abort; ZODB 6 needs it before the retry.
                transaction.abort()
                time.sleep(POLL_SECONDS)
            else:
                break

    def new_messages(self) -> list[str]:
        """The seed's full scan: every key is compared with the last one returned."""
        if not hasattr(self, "_v_last_time"):
            self._v_last_time = 0
        new = []
        last = self._v_last_time
        for key, message in self._messages.items():
            if key > last:
                new.append(message)
                self._v_last_time = key
        return new


def seed_room(connection: Any, name: str) -> SeedChatSession:
    """The seed room ``name`` in ``connection``'s database, created (uncommitted) if missing."""
    root = connection.root()
    rooms = root.get(_ROOT_KEY)
    if rooms is None:
        rooms = root[_ROOT_KEY] = OOBTree()
    room = rooms.get(name)
    if room is None:
        room = rooms[name] = SeedChatSession(name)
    return room


def fill(
    room: SeedChatSession, count: int, commit: Callable[[], None], batch: int = 100_000
) -> None:
    """Add ``count`` messages quickly (keys spaced 1 ms apart, ending now), calling
    ``commit`` every ``batch`` messages; the seed's ``add_message`` would take hours."""
    start = time.time() - count / 1000
    messages = room._messages
    for index in range(count):
        messages[start + index / 1000] = f"history message {index}"
        if (index + 1) % batch == 0:
            commit()
    commit()
