"""The server's index of chatzeo's graph: the role of every object, who owns it.

Every object chatzeo's graph reaches has a *role* on the server, ``(kind, owner)``:
the ZODB root and the `ChatRoot` (``root``); the nodes and buckets of
``ChatRoot.rooms``, ``.users`` and ``.private`` (``rooms``, ``users``, ``private``);
each `PrivateRoom` (``access``); each `ChatSession` (``session``), its `RoomClock`
(``clock``) and the nodes and buckets of its message and presence trees
(``messages``, ``presence``), all owned by the session's oid; each `User`
(``user``), its `ReadMarkers` (``markers``) and the nodes and buckets of its
leases (``leases``), owned by the user's name. The commit rules
(`chatzeo.server.rules`) check only records that have a role, or that a record
with one links in.

`TrustIndex.build` walks the graph when the server starts (tree nodes are loaded,
message buckets only named); `TrustIndex.apply` adds what each finished commit
linked in (an `IndexUpdate`, made by `chatzeo.server.rules.check_commit`). The
index also keeps the decoded states of recent revisions (bounded by their
pickles' bytes), so the next commit of a bucket need not load and decode its base
again, and each room's retention (`RoomOwnership`), which never changes once the
room is committed.

Threads: ZEO runs votes and finishes in its asyncio loop thread, so `build`,
`apply` and every read of the index run there, one at a time; the storage's loads
are thread-safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ZODB.POSException import ConflictError, POSKeyError
from ZODB.utils import p64, u64

from .. import records
from .decoding import ROOT_OID, Ref, Undecodable, decode, load, shape_of

__all__ = ["CLASSES", "TREE_KINDS", "IndexUpdate", "Role", "RoomOwnership", "TrustIndex",
           "room_ownership"]

Role = tuple[str, Any]  # (kind, owner): owner is a session oid, a user name or None

# The kinds whose objects are BTree nodes and buckets, and the classes each kind's
# objects may have: an object keeps its role's class for good.
TREE_KINDS = ("messages", "presence", "rooms", "users", "leases", "private")
CLASSES = {
    "messages": ("BTrees.LOBTree.LOBTree", "BTrees.LOBTree.LOBucket"),
    "presence": ("BTrees.OOBTree.OOBTree", "BTrees.OOBTree.OOBucket"),
    "rooms": ("BTrees.OOBTree.OOBTree", "BTrees.OOBTree.OOBucket"),
    "users": ("BTrees.OOBTree.OOBTree", "BTrees.OOBTree.OOBucket"),
    "leases": ("BTrees.OOBTree.OOBTree", "BTrees.OOBTree.OOBucket"),
    "private": ("BTrees.OOBTree.OOBTree", "BTrees.OOBTree.OOBucket"),
    "access": ("chatzeo.privacy.PrivateRoom",),
    "session": ("chatzeo.session.ChatSession",),
    "clock": ("chatzeo.session.RoomClock",),
    "user": ("chatzeo.realm.User",),
    "markers": ("chatzeo.markers.ReadMarkers",),
}

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RoomOwnership:
    """A room's retention and the oids of its message tree and clock: what the rules
    need of a room. A ChatSession never changes them once committed."""

    name: str
    max_messages: int | None
    max_age: float | None
    messages: bytes
    clock: bytes


@dataclass
class IndexUpdate:
    """Roles and rooms a commit adds, applied once the commit is finished."""

    roles: dict[bytes, Role] = field(default_factory=dict)
    rooms: dict[bytes, RoomOwnership] = field(default_factory=dict)
    # oid -> (class name, state, pickle size) of the checked records, as sent
    states: dict[bytes, tuple[str, Any, int]] = field(default_factory=dict)


class TrustIndex:
    """The role of every object of chatzeo's graph, every room's retention, and the
    root's connection rules."""

    # Decoded states kept so that the next commit of an object need not load and
    # decode the revision it starts from: posting rewrites the same clock and last
    # bucket. Bounded by the pickles' bytes, not by their number, since one record
    # may be large; a decoded state takes a few times its pickle's size.
    cache_bytes = 8 * 1024 * 1024

    def __init__(self) -> None:
        self.roles: dict[bytes, Role] = {}
        self.rooms: dict[bytes, RoomOwnership] = {}
        # oid -> (tid, class, state, pickle bytes, checked); insertion order is age.
        # ``checked``: the state came from a commit this server checked.
        self.states: dict[bytes, tuple[bytes, str, Any, int, bool]] = {}
        self.cached_bytes = 0
        self.root_oid: bytes | None = None
        self.max_connections = 8
        self.lease_seconds = 60.0

    @classmethod
    def build(cls, storage: Any) -> TrustIndex:
        """Walk chatzeo's graph in ``storage`` (a root made by `chatzeo.realm.get_root`)."""
        index = cls()
        index.roles[ROOT_OID] = ("root", None)
        _, root = load(storage, ROOT_OID)
        chat_root = root.get("data", {}).get("chatzeo") if isinstance(root, dict) else None
        if not isinstance(chat_root, Ref):
            return index
        index.roles[chat_root.oid] = ("root", None)
        index.root_oid = chat_root.oid
        _, state = load(storage, chat_root.oid)
        if records.root_problem(state) is None:
            index.max_connections = state["max_connections"]
            index.lease_seconds = float(state["lease_seconds"])
        # A record an older server let in must not keep this one from starting: it
        # is logged, `chatzeo check` reports it, and what could be indexed is.
        for name, value in index._walk(storage, state["rooms"].oid, ("rooms", None)):
            index._tolerate(f"room {name!r}", index._add_room, storage, value, name)
        for name, value in index._walk(storage, state["users"].oid, ("users", None)):
            index._tolerate(f"user {name!r}", index._add_user, storage, value, name)
        # Private rooms (chatzeo.privacy): their sessions are rooms like any other;
        # who may read and change them is chatzeo.server.readguard's business.
        private = state.get("private")
        if isinstance(private, Ref):
            for name, value in index._walk(storage, private.oid, ("private", None)):
                index._tolerate(f"private room {name!r}", index._add_private, storage, value)
        return index

    def _tolerate(self, what: str, add: Callable[..., None], *args: Any) -> None:
        try:
            add(*args)
        except (Undecodable, KeyError, AttributeError, TypeError, ValueError) as error:
            log.warning("%s is malformed, indexed only in part: %s", what, error)

    def _add_private(self, storage: Any, value: Any) -> None:
        self.roles[value.oid] = ("access", value.oid)
        _, access = load(storage, value.oid)
        self._add_room(storage, access["session"], access["name"])

    def _add_user(self, storage: Any, value: Any, name: str) -> None:
        self.roles[value.oid] = ("user", name)
        _, user = load(storage, value.oid)
        list(self._walk(storage, user["leases"].oid, ("leases", name)))
        if isinstance(user.get("markers"), Ref):
            self.roles[user["markers"].oid] = ("markers", name)

    def apply(self, update: IndexUpdate, tid: bytes, resolved: Iterable[bytes] = ()) -> None:
        """Record what a commit finished as ``tid`` added. The states of the records
        in ``resolved`` were merged by conflict resolution, so they are not kept."""
        self.roles.update(update.roles)
        self.rooms.update(update.rooms)
        merged = set(resolved)
        for oid, (class_name, state, size) in update.states.items():
            self._forget(oid)
            if oid not in merged:
                self._keep(oid, (tid, class_name, state, size, True))

    def _forget(self, oid: bytes) -> None:
        entry = self.states.pop(oid, None)
        if entry is not None:
            self.cached_bytes -= entry[3]

    def _keep(self, oid: bytes, entry: tuple[bytes, str, Any, int, bool]) -> None:
        if entry[3] > self.cache_bytes // 4:
            return  # one record may not push out everything else
        self.states[oid] = entry
        self.cached_bytes += entry[3]
        states = self.states
        while self.cached_bytes > self.cache_bytes:
            self._forget(next(iter(states)))

    def current(self, storage: Any, oid: bytes, as_of: bytes | None = None) -> tuple[str, Any]:
        """The newest committed state of ``oid``, decoded once per revision; with
        ``as_of``, its state in the view of transaction ``as_of`` (an older revision
        if a later commit changed it). Raises `ConflictError` if that revision was
        packed away: the writer then retries from a fresh view."""
        data, tid = storage.load(oid)
        if as_of is not None and tid > as_of:
            try:
                older = storage.loadBefore(oid, p64(u64(as_of) + 1))
            except POSKeyError:
                older = None
            if older is None:
                raise ConflictError(oid=oid, serials=(as_of,))
            data, start, _ = older
            return self.cached(oid, start) or decode(data)  # kept: the newest only
        found = self.cached(oid, tid)
        if found is None:
            found = decode(data)
            self._forget(oid)
            self._keep(oid, (tid, *found, len(data), False))
        return found

    def cached(self, oid: bytes, tid: bytes) -> tuple[str, Any] | None:
        entry = self.states.get(oid)
        return (entry[1], entry[2]) if entry is not None and entry[0] == tid else None

    def checked(self, oid: bytes, tid: bytes) -> bool:
        """Whether the cached state of ``oid`` at ``tid`` was written by a checked commit."""
        entry = self.states.get(oid)
        return entry is not None and entry[0] == tid and entry[4]

    def _add_room(self, storage: Any, value: Any, name: str) -> None:
        oid = value.oid
        self.roles[oid] = ("session", oid)
        _, state = load(storage, oid)
        self.rooms[oid] = room_ownership(state)
        self.roles[state["_clock"].oid] = ("clock", oid)
        # Message buckets are only named, not walked: the walk costs the tree nodes.
        list(self._walk(storage, state["_messages"].oid, ("messages", oid), items=False))
        list(self._walk(storage, state["presence"].oid, ("presence", oid)))

    def _walk(
        self, storage: Any, oid: bytes, role: Role, items: bool = True
    ) -> Iterable[tuple[Any, Any]]:
        """Give ``role`` to the tree at ``oid`` and everything in it; yield its items."""
        pending = [oid]
        while pending:
            current = pending.pop()
            self.roles[current] = role
            class_name, state = load(storage, current)
            shape = shape_of(class_name, state)
            yield from shape.items.items()
            # A node's children are all buckets or all nodes: one load tells which.
            if shape.children and not items and load(storage, shape.children[0])[
                0
            ].endswith("Bucket"):
                self.roles.update(dict.fromkeys(shape.children, role))
            else:
                pending.extend(shape.children)


def room_ownership(state: Any) -> RoomOwnership:
    """The `RoomOwnership` of a decoded ChatSession state; raises `Undecodable`,
    `KeyError` or `AttributeError` for a malformed one."""
    max_messages = state.get("max_messages")
    max_age = state.get("max_age")
    if max_messages is not None and not isinstance(max_messages, int):
        raise Undecodable("has a bad max_messages")
    if max_age is not None and not isinstance(max_age, int | float):
        raise Undecodable("has a bad max_age")
    return RoomOwnership(
        state["name"], max_messages, max_age, state["_messages"].oid, state["_clock"].oid
    )
