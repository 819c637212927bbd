"""Helpers the test modules share that are about this repository, not about running
chatzeo (those are in `chatzeo.testing`): where the repository is, and a check of what a
room stores that reads its private trees. Imported by test modules as ``support``
(pytest puts tests/ on ``sys.path``); runs in the calling thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transaction

from chatzeo import get_root, open_db

__all__ = ["REPO", "stored"]

REPO = Path(__file__).resolve().parent.parent


def stored(target: str, room: str) -> list[tuple[int, Any]]:
    """Every (key, record) of ``room`` (its tree, then its clock's pending entries),
    read through a fresh client, after checking they are in key order and the room's
    clock agrees with them (count, head and flushed)."""
    db = open_db(target, wait=30)
    try:
        manager = transaction.TransactionManager()
        connection = db.open(transaction_manager=manager)
        session = get_root(connection).rooms[room]
        tree, pending = list(session._messages.items()), list(session._clock.pending)
        items = tree + pending
        assert [key for key, _ in items] == sorted({key for key, _ in items})
        assert session._clock.count == len(items)
        assert not items or session._clock.head == items[-1][0]
        assert not tree or session._clock.flushed >= tree[-1][0]
        manager.abort()
        connection.close()
        return items
    finally:
        db.close()
