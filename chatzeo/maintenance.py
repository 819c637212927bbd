"""Looking after a chatzeo storage: `check_file` (``chatzeo check``) and `pack` (``chatzeo pack``).

`check_file` reads a FileStorage data file without locking it, so it may run beside a
live server (it then sees the file as of the moment it opened it). It checks, in order:

1. the file's framing, as ZODB's ``fstest`` does (every transaction and data record
   has a consistent length, status and back pointer);
2. references, as ``fsrefs`` does: every object the current records refer to exists;
   every transaction extension is a plain mapping (read without unpickling it:
   `chatzeo.protocol.unsafe_extensions`; ZODB's undo log would run any other);
3. chatzeo's invariants, loading only allowlisted classes: in each room the message
   tree is sound (``BTrees.check``) and the clock's pending entries have strictly
   increasing keys, all above the tree's; the clock's ``count`` is the number of
   messages in both places, its ``head`` is at least the largest key (equal unless
   retention removed every message), its ``flushed`` at least the tree's largest key,
   and every message record is a well-formed ``(id, author, text, kind)``.

It stops at the first framing error (nothing after it can be trusted) and otherwise
collects every problem. Runs in the calling thread.
"""

from __future__ import annotations

import os
from typing import Any

import transaction
import ZODB
import ZODB.FileStorage
from BTrees.check import check as check_btree
from ZODB.scripts.fstest import FormatError
from ZODB.scripts.fstest import check as fstest_check
from ZODB.serialize import referencesf
from ZODB.utils import oid_repr

from .allowlist import class_factory
from .errors import ChatError
from .message import _KINDS
from .protocol import unsafe_extensions
from .realm import ROOT_KEY

__all__ = ["check_file", "pack", "StorageDamaged"]


class StorageDamaged(ChatError):
    """``chatzeo check`` found problems in a data file; ``problems`` lists them."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        shown = "; ".join(problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        super().__init__(f"{path} is damaged: {shown}{more}")


def check_file(path: str | os.PathLike[str]) -> dict[str, int]:
    """Check the FileStorage data file at ``path``; return counts of what was checked.

    Raises `StorageDamaged` naming every problem found, `FileNotFoundError` if there
    is no such file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    try:
        fstest_check(path)
    except FormatError as error:
        raise StorageDamaged(path, [f"broken file structure: {error}"]) from None
    storage = ZODB.FileStorage.FileStorage(path, read_only=True)
    try:
        problems, counts = _check_references(storage)
        problems += unsafe_extensions(storage)
        db = ZODB.DB(storage, class_factory=class_factory)
        try:
            problems += _check_rooms(db, counts)
        finally:
            db.close()
    finally:
        storage.close()
    if problems:
        raise StorageDamaged(path, problems)
    return counts


def _check_references(storage: Any) -> tuple[list[str], dict[str, int]]:
    problems: list[str] = []
    index = storage._index  # FileStorage's oid -> position map; fsrefs reads it too.
    for oid in index.keys():
        try:
            data, _ = storage.load(oid)
        except Exception as error:
            problems.append(f"object {oid_repr(oid)} cannot be read: {error}")
            continue
        if not data:
            continue  # an undone creation
        try:
            refs = referencesf(data)
        except Exception as error:
            problems.append(f"object {oid_repr(oid)} is not a readable pickle: {error}")
            continue
        for ref in refs:
            if ref not in index:
                problems.append(f"object {oid_repr(oid)} refers to missing {oid_repr(ref)}")
    return problems, {"objects": len(index), "rooms": 0, "messages": 0}


def _check_rooms(db: Any, counts: dict[str, int]) -> list[str]:
    problems: list[str] = []
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    try:
        chat_root = connection.root().get(ROOT_KEY)
        if chat_root is None:
            return problems
        for name, room in chat_root.rooms.items():
            counts["rooms"] += 1
            problems += [f"room {name!r}: {p}" for p in _check_room(room, counts)]
    except ChatError as error:
        problems.append(str(error))
    finally:
        manager.abort()
        connection.close()
    return problems


def _check_room(room: Any, counts: dict[str, int]) -> list[str]:
    problems: list[str] = []
    tree = room._messages
    try:
        check_btree(tree)
    except AssertionError as error:
        problems.append(f"message tree is damaged: {error}")
    keys = list(tree.keys())
    clock = room._clock
    pending = clock.pending
    if not (isinstance(pending, tuple) and all(
        isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], int)
        for entry in pending
    )):
        return [*problems, f"clock's pending entries are malformed: {pending!r:.80}"]
    pending_keys = [key for key, _ in pending]
    counts["messages"] += len(keys) + len(pending_keys)
    if not _increasing(keys):
        problems.append("message keys are not strictly increasing")
    if not _increasing(pending_keys):
        problems.append("pending message keys are not strictly increasing")
    if keys and pending_keys and pending_keys[0] <= keys[-1]:
        problems.append(f"pending key {pending_keys[0]} is not above the tree's {keys[-1]}")
    held = len(keys) + len(pending_keys)
    if clock.count != held:
        problems.append(f"clock counts {clock.count} messages but the room holds {held}")
    newest = max(keys[-1:] + pending_keys[-1:], default=None)
    if newest is not None and clock.head < newest:
        problems.append(f"clock head {clock.head} is below the largest key {newest}")
    if keys and clock.flushed is not None and clock.flushed < keys[-1]:
        problems.append(f"clock flushed {clock.flushed} is below the tree's largest key {keys[-1]}")
    for key, record in [*tree.items(), *pending]:
        if not _well_formed(record):
            problems.append(f"message at key {key} is malformed: {record!r:.80}")
    return problems


def _increasing(keys: list[int]) -> bool:
    return all(earlier < later for earlier, later in zip(keys, keys[1:], strict=False))


def _well_formed(record: Any) -> bool:
    if not (isinstance(record, tuple) and len(record) == 4):
        return False
    message_id, author, text, kind = record
    return (
        isinstance(message_id, str)
        and (author is None or isinstance(author, str))
        and isinstance(text, str)
        and isinstance(kind, int)
        and 0 <= kind < len(_KINDS)
    )


def pack(db: Any, days: float = 0.0) -> None:
    """Pack ``db``'s storage: drop object revisions older than ``days`` days that are
    no longer current, and unreachable objects (messages retention removed).

    Through a ZEO client the server packs; readers and writers carry on meanwhile.
    """
    db.pack(days=days)
