"""What a hostile client stores, bypassing chatzeo's validation as any ZEO client can.

`post_unchecked` appends a raw message record, so tests can check that what readers
draw is defused; `post_record` appends any record at all; `rewrite_record` stores a
record's pickle with its state changed at will, bypassing BTrees' own type checks
(a float key in an ``LOBucket``), as a raw ZEO client can. `Payload` pickles as a
call of ``os.system`` (the pickle names the global ``posix.system``); the command
writes the loading process's pid into ``marker``, so a test can tell whether it ran
and in which process. `Trojan` is a persistent class chatzeo does not know, stored as
a record of its own.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from typing import Any

import transaction
import ZODB
from persistent import Persistent
from ZODB.Connection import TransactionMetaData

from chatzeo.message import new_message_id
from chatzeo.realm import get_root


def post_unchecked(db: ZODB.DB, room: str, author: str, text: str) -> None:
    """Append ``(id, author, text, "say")`` to ``room`` as the next message, unvalidated."""
    post_record(db, room, (new_message_id(), author, text, 0))


def post_record(db: ZODB.DB, room: str, record: Any, key: Any = None) -> None:
    """Append ``(key, record)`` to ``room``'s pending entries (key: the next one)."""
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    try:
        with manager:
            session = get_root(connection).room(room)
            clock = session._clock
            key = clock.head + 1 if key is None else key
            # Where chatzeo's own posts go: the room clock's pending entries.
            clock.pending = (*clock.pending, (key, record))
            clock.head = key if isinstance(key, int) else clock.head + 1
            clock.count += 1
    finally:
        connection.close()


class _Reference:
    """A persistent reference carried through unchanged."""

    def __init__(self, pid: Any) -> None:
        self.pid = pid


def rewrite_record(db: ZODB.DB, oid: bytes, change: Callable[[Any], Any]) -> None:
    """Commit ``oid``'s record with its state replaced by ``change(state)``.

    The state is the record's pickled state as plain data (persistent references
    opaque), so anything can be put in, whatever the class's own code would allow.
    Raises what the server raises for a refused commit (the transaction is aborted).
    """
    storage = db.storage
    data, serial = storage.load(oid)
    unpickler = pickle.Unpickler(io.BytesIO(data))
    unpickler.persistent_load = _Reference  # type: ignore[method-assign]
    meta = unpickler.load()
    state = change(unpickler.load())
    out = io.BytesIO()
    pickler = pickle.Pickler(out, 3)
    pickler.persistent_id = (  # type: ignore[method-assign]
        lambda obj: obj.pid if isinstance(obj, _Reference) else None
    )
    pickler.dump(meta)
    pickler.dump(state)
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    try:
        storage.store(oid, serial, out.getvalue(), "", txn)
        storage.tpc_vote(txn)
    except BaseException:
        storage.tpc_abort(txn)
        raise
    storage.tpc_finish(txn)


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        # $PPID: the shell's parent, i.e. the process that unpickled the payload.
        return (os.system, (f"echo $PPID > {self.marker}",))


class Trojan(Persistent):
    def __init__(self, marker: str) -> None:
        self.payload = Payload(marker)
