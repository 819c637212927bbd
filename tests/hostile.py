"""What a hostile client stores, bypassing chatzeo's validation as any ZEO client can.

`post_unchecked` appends a raw message record, so tests can check that what readers
draw is defused. `Payload` pickles as a call of ``os.system`` (the pickle names the
global ``posix.system``); the command writes the loading process's pid into
``marker``, so a test can tell whether it ran and in which process. `Trojan` is a
persistent class chatzeo does not know, stored as a record of its own.
"""

from __future__ import annotations

import os
from typing import Any

import transaction
import ZODB
from persistent import Persistent

from chatzeo.message import new_message_id
from chatzeo.realm import get_root


def post_unchecked(db: ZODB.DB, room: str, author: str, text: str) -> None:
    """Append ``(id, author, text, "say")`` to ``room`` as the next message, unvalidated."""
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    try:
        with manager:
            session = get_root(connection).room(room)
            clock = session._clock
            key = clock.head + 1
            # Where chatzeo's own posts go: the room clock's pending entries.
            clock.pending = (*clock.pending, (key, (new_message_id(), author, text, 0)))
            clock.head = key
            clock.count += 1
    finally:
        connection.close()


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        # $PPID: the shell's parent, i.e. the process that unpickled the payload.
        return (os.system, (f"echo $PPID > {self.marker}",))


class Trojan(Persistent):
    def __init__(self, marker: str) -> None:
        self.payload = Payload(marker)
