"""Looking after a chatzeo storage: `check_file` (``chatzeo check``) and `pack` (``chatzeo pack``).

`check_file` reads a FileStorage data file without locking it, so it may run beside a
live server (it then sees the file as of the moment it opened it). It checks, in order:

1. the file's framing, as ZODB's ``fstest`` does (every transaction and data record
   has a consistent length, status and back pointer);
2. references, as ``fsrefs`` does: every object the current records refer to exists;
   every transaction extension is a plain mapping (read without unpickling it:
   `unsafe_extensions`; ZODB's undo log would run any other);
3. chatzeo's invariants, loading only allowlisted classes: in each room the message
   tree is sound (``BTrees.check``) and the clock's pending entries have strictly
   increasing keys, all above the tree's; the clock's ``count`` is the number of
   messages in both places, its ``head`` is at least the largest key (equal unless
   retention removed every message), its ``flushed`` at least the tree's largest key;
   and every record (root, rooms, clocks, messages, presence, users, leases) keeps
   the shapes of `chatzeo.records`, the same rules the server enforces and readers
   apply. A record that cannot even be loaded is reported, never a crash.

It stops at the first framing error (nothing after it can be trusted) and otherwise
collects every problem. Runs in the calling thread.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import transaction
import ZODB
import ZODB.FileStorage
from BTrees.check import check as check_btree
from ZODB.POSException import POSError
from ZODB.scripts.fstest import FormatError
from ZODB.scripts.fstest import check as fstest_check
from ZODB.serialize import referencesf
from ZODB.utils import oid_repr

from . import records
from .allowlist import class_factory
from .errors import ChatError, StorageDamaged
from .realm import ROOT_KEY, User
from .session import ChatSession

__all__ = ["check_file", "pack", "StorageDamaged"]


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
    for oid in index:
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
        chat_root._p_activate()
        problem = records.root_problem(dict(chat_root.__dict__))
        if problem is not None:
            return [problem]
        for name, room in _items(chat_root.rooms, "the room directory", problems):
            counts["rooms"] += 1
            label = f"room {name!a}"
            problems += [f"{label}: {p}" for p in _guarded(_check_room, name, room, counts)]
        now = time.time()
        for name, user in _items(chat_root.users, "the user directory", problems):
            label = f"user {name!a}"
            problems += [f"{label}: {p}" for p in _guarded(
                _check_user, name, user, chat_root, now
            )]
    except _DATA_ERRORS as error:
        problems.append(f"chatzeo's root cannot be read: {_one_line(error)}")
    finally:
        manager.abort()
        connection.close()
    return problems


# What a record that cannot be loaded raises; transient errors are not among them.
_DATA_ERRORS = (ChatError, POSError, TypeError, ValueError, AttributeError, KeyError, IndexError)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {ascii(text)[1:-1][:120]}" if text else type(error).__name__


def _items(tree: Any, what: str, problems: list[str]) -> list[tuple[Any, Any]]:
    try:
        return list(tree.items())
    except _DATA_ERRORS as error:
        problems.append(f"{what} cannot be read: {_one_line(error)}")
        return []


def _guarded(check: Any, *args: Any) -> list[str]:
    """``check(*args)``'s problems; a check that meets an unreadable record reports
    it instead of stopping the whole run."""
    try:
        found: list[str] = check(*args)
        return found
    except _DATA_ERRORS as error:
        return [f"cannot be read: {_one_line(error)}"]


def _check_user(name: Any, user: Any, root: Any, now: float) -> list[str]:
    problems: list[str] = []
    problem = records.name_problem("user", name, records.MAX_USER_NAME)
    if problem is not None:
        problems.append(f"name {problem}")
    if not isinstance(user, User):
        return [*problems, f"is a {type(user).__name__}, not a User"]
    user._p_activate()
    problem = records.user_problem(dict(user.__dict__))
    if problem is not None:
        return [*problems, problem]
    live = 0
    for lease_id, entry in _items(user.leases, "leases", problems):
        problem = records.lease_problem(lease_id, entry) or records.expiry_problem(
            entry[1], now, root.lease_seconds
        )
        if problem is not None:
            problems.append(problem)
        elif entry[1] > now:
            live += 1
    if live > root.max_connections:
        problems.append(f"holds {live} live leases; the limit is {root.max_connections}")
    return problems


def _check_room(name: Any, room: Any, counts: dict[str, int]) -> list[str]:
    problems: list[str] = []
    problem = records.name_problem("room", name, records.MAX_ROOM_NAME)
    if problem is not None:
        problems.append(f"name {problem}")
    if not isinstance(room, ChatSession):
        return [*problems, f"is a {type(room).__name__}, not a ChatSession"]
    if room.problem is not None:
        return [*problems, room.problem]
    if room.name != name:
        problems.append(f"is filed under another name than its own {room.name!a}")
    tree = room._messages
    try:
        check_btree(tree)
    except AssertionError as error:
        problems.append(f"message tree is damaged: {error}")
    except _DATA_ERRORS as error:
        return [*problems, f"message tree cannot be read: {_one_line(error)}"]
    tree_items = _items(tree, "message tree", problems)
    keys = [key for key, _ in tree_items]
    clock = room._clock
    pending = clock.pending
    pending_keys = [key for key, _ in pending]
    counts["messages"] += len(keys) + len(pending_keys)
    for key in keys:
        problem = records.key_problem(key)
        if problem is not None:
            problems.append(f"message tree {problem}")
    if not _increasing(keys):
        problems.append("message keys are not strictly increasing")
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
    for key, record in [*tree_items, *pending]:
        problem = records.message_problem(record)
        if problem is not None:
            problems.append(f"message at key {key} is malformed: {problem}")
    for lease_id, entry in _items(room.presence, "presence", problems):
        problem = records.presence_problem(lease_id, entry)
        if problem is not None:
            problems.append(problem)
    return problems


def _increasing(keys: list[Any]) -> bool:
    try:
        return all(earlier < later for earlier, later in itertools.pairwise(keys))
    except TypeError:
        return False


def pack(db: Any, days: float = 0.0) -> None:
    """Pack ``db``'s storage: drop object revisions older than ``days`` days that are
    no longer current, and unreachable objects (messages retention removed).

    Through a ZEO client the server packs; readers and writers carry on meanwhile.
    """
    db.pack(days=days)


def unsafe_extensions(storage: Any) -> list[str]:
    """One problem line per transaction of ``storage`` (a FileStorage) whose stored
    extension is not a plain mapping: what a client could store before chatzeo's
    protocol checks (ZODB's own tools, such as the undo log, would run such a
    pickle). Reads the raw bytes only (`records.stored_extension`)."""
    return [
        f"transaction {record.tid.hex()} has an extension that is not a plain "
        "mapping (not loaded; ZODB's undo log would run it)"
        for record in storage.iterator()
        if records.stored_extension(record.extension_bytes) is None
    ]
