"""The globals chatzeo lets a pickle name: its own classes, persistent, BTrees, plain data.

Any client of a ZEO server can store any pickle, and a pickle can name any global,
such as ``os.system``, to be called when it is loaded. Every database `open_db`
returns loads through `class_factory`, which refuses every other global with
`UnsafeRecord` before anything is imported or called. The same `is_allowed` check
guards conflict resolution on the server (`chatzeo.server.serve`).
"""

from __future__ import annotations

import io
import logging
import pickle
from typing import Any

import ZODB.ConflictResolution

from .errors import UnsafeRecord

__all__ = [
    "is_allowed",
    "class_factory",
    "find_global",
    "guard_conflict_resolution",
    "safe_loads",
]

_zodb_find_global = ZODB.ConflictResolution.find_global

log = logging.getLogger(__name__)

_ALLOWED: dict[str, frozenset[str]] = {
    "chatzeo.session": frozenset({"ChatSession", "RoomClock"}),
    "chatzeo.realm": frozenset({"ChatRoot", "User"}),
    "chatzeo.markers": frozenset({"ReadMarkers"}),
    "chatzeo.privacy": frozenset({"PrivateRoom"}),
    "persistent.mapping": frozenset({"PersistentMapping"}),
    "persistent.list": frozenset({"PersistentList"}),
    "persistent": frozenset({"Persistent", "PersistentMapping"}),
    "ZODB.PersistentMapping": frozenset({"PersistentMapping"}),
    "BTrees.Length": frozenset({"Length"}),
    "builtins": frozenset({"set", "frozenset", "bytearray", "complex"}),
}
_BTREE_KINDS = ("BTree", "Bucket", "Set", "TreeSet")


def is_allowed(module: str, name: str) -> bool:
    """True if a pickle may name ``module.name``."""
    if name in _ALLOWED.get(module, ()):
        return True
    # BTrees.OOBTree.OOBTree, BTrees.LOBTree.LOBucket, ...: the module names the family.
    if module.startswith("BTrees.") and module.count(".") == 1:
        family = module[len("BTrees."):]
        return family.endswith("BTree") and name.startswith(family[:-5]) and (
            name[len(family) - 5:] in _BTREE_KINDS
        )
    return False


def find_global(module: str, name: str) -> Any:
    """Import and return ``module.name`` if allowed; raise `UnsafeRecord` otherwise."""
    if not is_allowed(module, name):
        log.warning("refused to load global %s.%s from a database record", module, name)
        raise UnsafeRecord(module, name)
    imported = __import__(module, fromlist=[name])
    return getattr(imported, name)


def class_factory(connection: Any, module: str, name: str) -> Any:
    """A `ZODB.DB` ``class_factory`` that loads only allowed globals."""
    return find_global(module, name)


def _resolving_find_global(module: str, name: str) -> Any:
    """ZODB's conflict-resolution loader, limited to allowed globals.

    A refused name becomes ZODB's ``BadClassName``, which conflict resolution turns
    into a plain `ConflictError` for the writer; nothing is imported or called.
    """
    if not is_allowed(module, name):
        log.warning("conflict resolution refused global %s.%s", module, name)
        raise ZODB.ConflictResolution.BadClassName(module, name)
    return _zodb_find_global(module, name)


def guard_conflict_resolution() -> None:
    """Make every conflict resolution in this process load only allowed globals.

    ZODB's ``tryToResolveConflict`` looks ``find_global`` up in its module at each
    call, so replacing it there covers a ZEO server and a client that resolves
    conflicts itself. Idempotent.
    """
    ZODB.ConflictResolution.find_global = _resolving_find_global


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"this pickle may not name {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("this pickle may not hold persistent references")


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` naming no global and no persistent reference: only plain
    data (numbers, bytes, str, tuples, lists, dicts, None, bools) comes out. For
    ZEO protocol messages and stored transaction extensions.

    Raises `pickle.UnpicklingError` (or another ``Exception`` for a damaged pickle)
    for anything else; nothing is imported or called.
    """
    return _NoGlobals(io.BytesIO(data)).load()
