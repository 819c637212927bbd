"""Helpers the test modules share that are about this repository, not about running
chatzeo (those are in `chatzeo.testing`): where the repository is, a check of what a
room stores that reads its private trees, and reading or changing chatzeo's root in a
fresh connection of its own. Imported by test modules as ``support``
(pytest puts tests/ on ``sys.path``); runs in the calling thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import transaction
import ZODB

from chatzeo import get_root, open_db
from chatzeo.realm import ChatRoot
from chatzeo.testing import PostgresCluster, ServerProcess, postgres_missing, require

__all__ = [
    "REPO", "stored", "edit", "read", "gather", "server_last_transaction",
    "Backend", "ZEOBackend", "PostgresBackend",
]

_T = TypeVar("_T")

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


def edit(db: ZODB.DB, change: Callable[[ChatRoot], _T]) -> _T:
    """Apply ``change`` to chatzeo's root in a fresh connection, commit, and return what
    ``change`` returned."""
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    try:
        result = change(get_root(connection))
        manager.commit()
        return result
    finally:
        manager.abort()
        connection.close()


def read(db: ZODB.DB, look: Callable[[ChatRoot], _T]) -> _T:
    """What ``look`` returns for chatzeo's root, read in a fresh connection."""
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    try:
        return look(get_root(connection))
    finally:
        manager.abort()
        connection.close()


def gather(into: list[_T], more: Callable[[], Iterable[_T]], count: int) -> Callable[[], bool]:
    """A `wait_until` condition: each call appends what ``more()`` returns to ``into``;
    true once ``into`` holds at least ``count`` items."""
    def enough() -> bool:
        into.extend(more())
        return len(into) >= count

    return enough


def server_last_transaction(db: ZODB.DB) -> bytes:
    """The last transaction id, asked of the ZEO server: the client's own view lags by
    the invalidations in flight."""
    tid: bytes = db.storage._call("lastTransaction")
    return tid


class Backend:
    """A running shared database the invariant tests run against, by kind.

    ``target`` is what `chatzeo.open_db` (and every `chatzeo` command) accepts;
    ``crash()`` kills the database server with -9 and ``restart()`` brings it back
    on the same address with the same data.
    """

    kind = "abstract"
    target: str

    def crash(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class ZEOBackend(Backend):
    """`chatzeo serve` over a FileStorage."""

    kind = "zeo"

    def __init__(self, data_dir: Path):
        self.server = ServerProcess(data_dir).start()
        self.target = self.server.address

    def crash(self) -> None:
        self.server.kill()

    def restart(self) -> None:
        self.server.start()

    def close(self) -> None:
        self.server.stop()


class PostgresBackend(Backend):
    """A throwaway PostgreSQL cluster (`chatzeo.testing.PostgresCluster`), clients on RelStorage
    directly, prepared by `chatzeo init-db`. Skips (or, with
    ``CHATZEO_REQUIRE_POSTGRES=1``, fails) where PostgreSQL cannot run."""

    kind = "postgres"

    def __init__(self, data_dir: Path):
        from chatzeo.initdb import init_db

        require("postgres", postgres_missing())
        self.cluster = PostgresCluster().start()
        try:
            self.target = self.cluster.create_database("chat")
            init_db(self.target)
        except BaseException:
            self.cluster.close()
            raise

    def crash(self) -> None:
        self.cluster.kill()

    def restart(self) -> None:
        self.cluster.start()

    def close(self) -> None:
        self.cluster.close()
