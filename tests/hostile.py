"""A hostile writer: stores a message record the way any ZEO client can, without
chatzeo's validation, so tests can check that what readers draw is defused."""

from __future__ import annotations

import transaction
import ZODB

from chatzeo.message import new_message_id
from chatzeo.realm import get_root


def post_unchecked(db: ZODB.DB, room: str, author: str, text: str) -> None:
    """Append ``(id, author, text, "say")`` to ``room`` as the next message, unvalidated."""
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    try:
        with manager:
            session = get_root(connection).room(room)
            key = session._clock.head + 1
            session._messages[key] = (new_message_id(), author, text, 0)
            session._clock.head = key
            session._clock.count += 1
    finally:
        connection.close()
