"""The rules every `chatzeo serve` applies to each commit before it is written.

Two sets of rules. The *record* rules hold on every server, TLS or not: every
record of chatzeo's graph keeps the shapes of `chatzeo.records` (types, sizes,
names, no attribute or object where chatzeo puts none), history is only appended
to (or trimmed by retention), trees keep their structure. The *identity* rules
(``identity``, ``author``, ``user``, ``presence`` ownership; the ZODB root left
alone) need to know who commits, so they apply only when the server has TLS
client certificates (``check_commit(..., enforce_identity=True)``). Objects outside
chatzeo's graph (an application's own, beside a `ChatSession` it embeds) are the
application's business and are not checked.

What is checked
    Every object chatzeo's graph reaches has a *role* on the server: the ZODB root,
    the `ChatRoot`, the nodes and buckets of ``ChatRoot.rooms`` and ``.users``, each
    `ChatSession`, its `RoomClock`, the nodes and buckets of its message tree and of
    its presence tree, each `User` and the nodes and buckets of its leases.
    `TrustIndex` knows the role of every such object; it is built by walking the graph
    when the server starts (tree nodes are loaded, message buckets only named) and
    grows with each commit that links new objects into the graph; it also keeps the
    decoded states of recent revisions (bounded by their pickles' bytes), so the
    next commit of a bucket need not load and decode its base again. A commit
    stores records; each
    record whose oid has a role, and each new object it links into the graph, is
    decoded with `chatzeo.allowlist` (nothing is imported or called) and compared with
    the state the writer started from (``loadSerial(oid, serial)``). Comparing with
    that base, not with the newest state, is what makes the checks hold under
    conflict resolution: BTrees and `RoomClock` merge a writer's *change* into the
    newest state (the clock also raises the keys of the entries it appends), and it
    is that change which is checked. So is retention's "oldest": against the room's
    tree as of the writer's clock base (a tree changes only with its clock), not the
    tree a concurrent flush has since filled with the entries the writer trims.

The rules (each refusal names one; docs/security.md explains them)
    ``schema``      every checked record keeps `chatzeo.records`' shape: message
                    tuples, keys (ints in range, in every bucket and node of a message
                    tree), clock fields and its pending bound, room and user fields
                    (no extra attribute), names, presence and lease entries; a lease
                    or presence expiry lies at most the root's ``lease_seconds`` (+
                    `FUTURE_SKEW`) ahead, and a user holds at most the root's
                    ``max_connections`` live leases after any commit that adds one.
    ``root``        the ChatRoot is never changed by a client; the ZODB root neither
                    under TLS, and without TLS it keeps its ``chatzeo`` entry.
    ``room``        an existing ChatSession is never changed (no rename, no new caps)
                    but for its ``topic`` (`chatzeo.records.topic_problem`), whose
                    time lies at most `FUTURE_SKEW` ahead; under TLS a topic names
                    its writer (anyone may set one, as on IRC without +t: the setter
                    is stored and shown). ChatRoot.rooms only gains keys, each a new
                    ChatSession named like its key, with new trees and a new clock.
    ``user``        a User is never renamed, keeps its leases tree, and its
                    ``markers`` are its own `ReadMarkers` (a new one, or the one it
                    had; `chatzeo.records.markers_problem` for their state); under TLS
                    it, its leases and its markers are changed only by the certificate
                    of the same name, and ChatRoot.users only gains the writer's own
                    new User.
    ``author``      a new message is ``(id, author, text, kind)`` with author = identity;
                    new messages arrive as entries appended to the room clock's
                    ``pending`` (or, in a flush, straight into the tree with the rest).
    ``history``     an existing message keeps its key and record: a pending entry stays
                    as it is, or a flush moves it unchanged into the tree; a message is
                    removed only by retention (older than ``max_age``, or the oldest
                    while ``max_messages`` stay); new keys are larger than the room
                    clock's head, at most `FUTURE_SKEW` ahead of the server's clock, and
                    the clock is written with them (pending keys in order and above the
                    tree's, its head the newest key, its count moving by exactly the
                    messages added and removed and its ``total`` by the messages
                    added (or not at all: older writers do not know it), its
                    ``flushed`` mark moving only with a flush and never below a key
                    put in the tree).
    ``identity``    a certificate without a single commonName changes nothing (TLS).
    ``presence``    a presence entry added, changed or removed names the writer.
    ``structure``   in every checked tree, keys are sorted, a child unlinked from a
                    node is emptied in the same commit or linked elsewhere in the same
                    tree, a newly linked child is a new object, a surviving child keeps
                    its separator key (or it rises to the child's first key, as BTrees
                    does when that key is deleted), the bucket chain skips only emptied
                    buckets and takes in every new bucket.
    A key that leaves one bucket and appears, with the same record, in another bucket
    of the same tree in the same commit has moved (a split), and is no change at all.

Threads: ZEO runs votes and finishes in its asyncio loop thread, so `check_commit`
and `TrustIndex.apply` run there, one at a time; the storage's loads are thread-safe.
"""

from __future__ import annotations

import functools
import io
import logging
import pickle
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ZODB.POSException import ConflictError, POSKeyError
from ZODB.utils import p64, u64

from .. import records
from ..allowlist import is_allowed
from ..errors import TrustViolation
from ..realm import ROOT_KEY
from ..records import FUTURE_SKEW

__all__ = ["TrustIndex", "IndexUpdate", "check_commit", "Ref", "decode", "FUTURE_SKEW"]

Z64 = b"\0" * 8
ROOT_OID = Z64
# FUTURE_SKEW (chatzeo.records): how far ahead of the server's clock a message key
# may be, and so how much a writer's clock may run ahead of the server's. It also
# widens the age bound of retention by as much.

_TREE_KINDS = ("messages", "presence", "rooms", "users", "leases", "private")
_CLASSES = {
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
_MISSING = object()

log = logging.getLogger(__name__)

Role = tuple[str, Any]  # (kind, owner): owner is a session oid, a user name or None


# -- decoding ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ref:
    """A persistent reference in a decoded record."""

    oid: bytes


@dataclass(frozen=True, slots=True)
class _Global:
    module: str
    name: str


class _Undecodable(Exception):
    pass


@functools.lru_cache(maxsize=256)
def _global(module: str, name: str) -> _Global | None:
    return _Global(module, name) if is_allowed(module, name) else None


class _Opaque:
    """Stands for an object of a class chatzeo does not know, in a lenient decode:
    built and filled as plain data, so none of that class's code runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


@functools.lru_cache(maxsize=256)
def _opaque(module: str, name: str) -> type[_Opaque]:
    # A class of our own per name, since pickle's NEWOBJ needs a class; nothing of
    # ``module`` is imported.
    return type(f"opaque {module}.{name}", (_Opaque,), {"__module__": __name__})


class _Unpickler(pickle.Unpickler):
    lenient = False

    def find_class(self, module: str, name: str) -> Any:
        found = _global(module, name)
        if found is None:
            if self.lenient:
                return _opaque(module, name)  # a name only: nothing imported or run
            raise _Undecodable(f"names {module}.{name}, which is not allowed")
        return found

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, bytes):
            return Ref(pid)
        if isinstance(pid, tuple) and pid and isinstance(pid[0], bytes):
            return Ref(pid[0])
        raise _Undecodable("holds a weak or cross-database reference")


def decode(data: bytes, lenient: bool = False) -> tuple[str, Any]:
    """A stored record as ``(dotted class name, state)``, persistent references as `Ref`.

    Globals are checked with `chatzeo.allowlist.is_allowed` and never imported; a
    record that needs more than plain data raises `_Undecodable`. ``lenient`` lets
    any global be *named* (an application's classes, referred to from the ZODB
    root); still nothing is imported or called.
    """
    try:
        unpickler = _Unpickler(io.BytesIO(data))
        unpickler.lenient = lenient
        meta = unpickler.load()
        state = unpickler.load()
    except _Undecodable:
        raise
    except Exception as error:
        raise _Undecodable(f"cannot be decoded ({type(error).__name__})") from None
    klass = meta[0] if isinstance(meta, tuple) and meta else meta
    if isinstance(klass, _Global):
        return f"{klass.module}.{klass.name}", state
    if (
        isinstance(klass, tuple)
        and len(klass) == 2
        and all(isinstance(part, str) for part in klass)
        and is_allowed(*klass)
    ):
        return f"{klass[0]}.{klass[1]}", state
    raise _Undecodable("has no class chatzeo knows")


@dataclass(frozen=True, slots=True)
class _Shape:
    """A BTree node or bucket: its items (bucket or inline tree), children, next link.

    ``link`` is a bucket's next bucket, or a tree node's first bucket.
    """

    items: dict[Any, Any]
    keys: tuple[Any, ...]  # the items' keys in stored order
    children: tuple[bytes, ...]
    separators: dict[bytes, Any]  # child oid -> the key before it (None for the first)
    link: bytes | None

    @property
    def empty(self) -> bool:
        return not self.items and not self.children


_EMPTY = _Shape({}, (), (), {}, None)


def _bucket_shape(state: Any) -> _Shape:
    if state is None:
        return _EMPTY
    if not isinstance(state, tuple) or not 1 <= len(state) <= 2:
        raise _Undecodable("is not a bucket")
    flat = state[0]
    if not isinstance(flat, tuple) or len(flat) % 2:
        raise _Undecodable("is not a bucket")
    keys = flat[0::2]
    link = state[1] if len(state) == 2 else None
    if link is not None and not isinstance(link, Ref):
        raise _Undecodable("has a bad next bucket")
    try:
        items = dict(zip(keys, flat[1::2], strict=True))
    except TypeError:
        raise _Undecodable("has unhashable items") from None
    return _Shape(items, keys, (), {}, link.oid if link else None)


def _tree_shape(state: Any) -> _Shape:
    if state is None:
        return _EMPTY
    if not isinstance(state, tuple) or not 1 <= len(state) <= 2:
        raise _Undecodable("is not a tree")
    if len(state) == 1:  # one bucket stored inside the tree
        if not isinstance(state[0], tuple) or len(state[0]) != 1:
            raise _Undecodable("is not a tree")
        inline = _bucket_shape(state[0][0])
        return _Shape(inline.items, inline.keys, (), {}, None)
    data, first = state
    if not isinstance(data, tuple) or not isinstance(first, Ref) or len(data) % 2 != 1:
        raise _Undecodable("is not a tree")
    children = data[0::2]
    if not all(isinstance(child, Ref) for child in children):
        raise _Undecodable("has a child that is not an object")
    separators = {child.oid: (data[2 * i - 1] if i else None) for i, child in enumerate(children)}
    return _Shape({}, (), tuple(c.oid for c in children), separators, first.oid)


def _shape(class_name: str, state: Any) -> _Shape:
    if class_name.endswith(("Bucket",)):
        return _bucket_shape(state)
    return _tree_shape(state)


# -- the index -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoomInfo:
    """What the rules need of a room; a ChatSession never changes once committed."""

    name: str
    max_messages: int | None
    max_age: float | None
    messages: bytes
    clock: bytes


@dataclass
class IndexUpdate:
    """Roles and rooms a commit adds, applied once the commit is finished."""

    roles: dict[bytes, Role] = field(default_factory=dict)
    rooms: dict[bytes, RoomInfo] = field(default_factory=dict)
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
        self.rooms: dict[bytes, RoomInfo] = {}
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
        _, root = _load(storage, ROOT_OID)
        chat_root = root.get("data", {}).get("chatzeo") if isinstance(root, dict) else None
        if not isinstance(chat_root, Ref):
            return index
        index.roles[chat_root.oid] = ("root", None)
        index.root_oid = chat_root.oid
        _, state = _load(storage, chat_root.oid)
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

    def _tolerate(self, what: str, add: Any, *args: Any) -> None:
        try:
            add(*args)
        except (_Undecodable, KeyError, AttributeError, TypeError, ValueError) as error:
            log.warning("%s is malformed, indexed only in part: %s", what, error)

    def _add_private(self, storage: Any, value: Any) -> None:
        self.roles[value.oid] = ("access", value.oid)
        _, access = _load(storage, value.oid)
        self._add_room(storage, access["session"], access["name"])

    def _add_user(self, storage: Any, value: Any, name: str) -> None:
        self.roles[value.oid] = ("user", name)
        _, user = _load(storage, value.oid)
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
        _, state = _load(storage, oid)
        self.rooms[oid] = _room_info(state)
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
            class_name, state = _load(storage, current)
            shape = _shape(class_name, state)
            yield from shape.items.items()
            # A node's children are all buckets or all nodes: one load tells which.
            if shape.children and not items and _load(storage, shape.children[0])[
                0
            ].endswith("Bucket"):
                self.roles.update(dict.fromkeys(shape.children, role))
            else:
                pending.extend(shape.children)


def _load(storage: Any, oid: bytes) -> tuple[str, Any]:
    data, _ = storage.load(oid)
    return decode(data)


def _room_info(state: Any) -> RoomInfo:
    max_messages = state.get("max_messages")
    max_age = state.get("max_age")
    if max_messages is not None and not isinstance(max_messages, int):
        raise _Undecodable("has a bad max_messages")
    if max_age is not None and not isinstance(max_age, int | float):
        raise _Undecodable("has a bad max_age")
    return RoomInfo(
        state["name"], max_messages, max_age, state["_messages"].oid, state["_clock"].oid
    )


# -- checking a commit ---------------------------------------------------------


def check_commit(
    identity: str | None,
    stores: Iterable[tuple[bytes, bytes, bytes]],
    storage: Any,
    index: TrustIndex,
    now: float | None = None,
    *,
    enforce_identity: bool = True,
) -> IndexUpdate:
    """Check the ``(oid, base serial, data)`` records of one commit by ``identity``.

    With ``enforce_identity`` (a server with client certificates) every rule
    applies; without it (``identity`` is then ignored) the record, history and
    structure rules do, and the identity rules do not.

    Returns the index entries the commit adds (apply them when it is finished).
    Raises `TrustViolation` naming the rule it breaks, or `ConflictError` if a base
    state is gone (packed away): the writer then retries from a fresh state.
    """
    return _Commit(
        identity if enforce_identity else None,
        stores,
        storage,
        index,
        time.time() if now is None else now,
        enforce_identity,
    ).run()


@dataclass
class _Record:
    oid: bytes
    serial: bytes
    data: bytes
    role: Role | None = None
    class_name: str = ""
    new_state: Any = None
    old_state: Any = None
    old_checked: bool = False  # the base state passed this server's checks
    decoded: bool = False

    @property
    def is_new(self) -> bool:
        return self.serial == Z64


@dataclass
class _Group:
    """The records of one tree (a room's messages, a user's leases, ...) in a commit."""

    records: list[_Record] = field(default_factory=list)
    removed: dict[Any, Any] = field(default_factory=dict)
    added: dict[Any, Any] = field(default_factory=dict)
    changed: dict[Any, tuple[Any, Any]] = field(default_factory=dict)


class _Commit:
    def __init__(
        self,
        identity: str | None,
        stores: Iterable[tuple[bytes, bytes, bytes]],
        storage: Any,
        index: TrustIndex,
        now: float,
        enforce_identity: bool = True,
    ) -> None:
        self.identity = identity
        self.enforce_identity = enforce_identity
        self.storage = storage
        self.index = index
        self.now = now
        self.records = {oid: _Record(oid, serial, data) for oid, serial, data in stores}
        self.update = IndexUpdate()
        self.shapes: dict[bytes, tuple[_Shape, _Shape]] = {}

    # -- driver

    def run(self) -> IndexUpdate:
        try:
            self._assign_roles()
            if (
                self.enforce_identity
                and self.identity is None
                and any(r.role for r in self.records.values())
            ):
                self.refuse("identity", "the client certificate names no single commonName")
            groups: dict[Role, _Group] = {}
            clocks: dict[bytes, _Record] = {}
            for record in self.records.values():
                if record.role is None:
                    continue
                kind, owner = record.role
                if kind in _TREE_KINDS:
                    groups.setdefault(record.role, _Group()).records.append(record)
                elif kind == "clock":
                    clocks[owner] = record
                else:
                    self._check_object(record)
            for role, group in groups.items():
                self._account(role, group)
            for role, group in groups.items():
                self._check_group(role, group, clocks)
            for owner, clock in clocks.items():
                self._check_clock(owner, clock, groups.get(("messages", owner), _Group()))
        except _Undecodable as error:
            raise TrustViolation(f"structure: a record {error}") from None
        except TypeError:  # keys of different types met in a comparison
            raise TrustViolation("structure: a tree holds keys that cannot be compared") from None
        return self.update

    def refuse(self, rule: str, detail: str) -> NoReturn:
        raise TrustViolation(f"{rule}: {detail}")

    def schema(self, problem: str | None) -> None:
        """Refuse under the ``schema`` rule if ``problem`` (a `chatzeo.records` finding)."""
        if problem is not None:
            self.refuse("schema", problem)

    # -- roles

    def _assign_roles(self) -> None:
        pending: list[_Record] = []
        for record in self.records.values():
            role = self.index.roles.get(record.oid)
            if role is not None:
                if record.is_new:
                    self.refuse("structure", "a new object reuses the oid of an existing one")
                record.role = role
                pending.append(record)
        while pending:
            record = pending.pop()
            kind, owner = record.role  # type: ignore[misc]
            if kind == "root":
                continue  # links nothing chatzeo checks; `_check_root` reads it
            self._decode(record)
            for child, role in self._linked(record, kind, owner):
                target = self.records.get(child)
                if target is None or not target.is_new:
                    continue  # checked by the rules of the record that links it
                if target.role is not None:
                    if target.role != role:
                        self.refuse("structure", "one new object is linked in two places")
                    continue
                target.role = role
                self.update.roles[child] = role
                pending.append(target)

    def _linked(self, record: _Record, kind: str, owner: Any) -> list[tuple[bytes, Role]]:
        """New objects ``record`` brings into the graph, with the role each gets."""
        if kind in _TREE_KINDS:
            _, new = self._shapes(record)
            linked = [(child, (kind, owner)) for child in new.children]
            if kind == "rooms":
                linked += [(v.oid, ("session", v.oid)) for v in new.items.values()
                           if isinstance(v, Ref)]
            elif kind == "users":
                linked += [(v.oid, ("user", k)) for k, v in new.items.items()
                           if isinstance(v, Ref)]
            elif kind == "private":
                linked += [(v.oid, ("access", v.oid)) for v in new.items.values()
                           if isinstance(v, Ref)]
            return linked
        state = record.new_state
        if kind == "session" and record.is_new and isinstance(state, dict):
            return [(_ref(state, "_messages"), ("messages", record.oid)),
                    (_ref(state, "_clock"), ("clock", record.oid)),
                    (_ref(state, "presence"), ("presence", record.oid))]
        if kind == "user" and isinstance(state, dict):
            linked = [(_ref(state, "leases"), ("leases", owner))] if record.is_new else []
            if isinstance(state.get("markers"), Ref):
                linked.append((state["markers"].oid, ("markers", owner)))
            return linked
        if kind == "access" and record.is_new and isinstance(state, dict):
            session = _ref(state, "session")
            return [(session, ("session", session))]
        return []

    # -- decoding

    def _decode(self, record: _Record) -> None:
        if record.decoded:
            return
        if len(record.data) > records.MAX_RECORD_BYTES:
            # Refused unread: decoding it would cost the server what the limit saves.
            self.refuse("schema", (
                f"a record of {len(record.data)} bytes; the limit is {records.MAX_RECORD_BYTES}"
            ))
        record.class_name, record.new_state = decode(record.data)
        kind = record.role[0] if record.role else ""
        if kind in _CLASSES and record.class_name not in _CLASSES[kind]:
            self.refuse("structure", f"a {kind} object was replaced by a {record.class_name}")
        self.update.states[record.oid] = (record.class_name, record.new_state, len(record.data))
        if not record.is_new:
            cached = self.index.cached(record.oid, record.serial)
            record.old_checked = self.index.checked(record.oid, record.serial)
            if cached is None:
                try:
                    old = self.storage.loadSerial(record.oid, record.serial)
                except POSKeyError:
                    raise ConflictError(oid=record.oid, serials=(record.serial,)) from None
                cached = decode(old)
            old_class, record.old_state = cached
            if old_class != record.class_name:
                self.refuse("structure", f"a {old_class} was replaced by a {record.class_name}")
        record.decoded = True

    def _shapes(self, record: _Record) -> tuple[_Shape, _Shape]:
        shapes = self.shapes.get(record.oid)
        if shapes is None:
            self._decode(record)
            old = _EMPTY if record.is_new else _shape(record.class_name, record.old_state)
            new = _shape(record.class_name, record.new_state)
            _check_sorted(new)
            self._check_items(record, old, new)
            shapes = self.shapes[record.oid] = (old, new)
        return shapes

    def _check_items(self, record: _Record, old: _Shape, shape: _Shape) -> None:
        """Every key (and separator) of a written node or bucket has its tree's key
        type, and every value its tree's value shape, unless it is exactly as it
        was stored (an entry an older, unchecking server let in must not keep
        honest writers out of its bucket). "Exactly" compares types too, since
        ``2 == 2.0`` and ``0 == False`` would hide a changed type."""
        kind = record.role[0] if record.role else ""
        key_rule = _KEY_RULES.get(kind)
        if key_rule is None:
            return
        before = {(type(key), key) for key in (*old.keys, *old.separators.values())}
        for key in (*shape.keys, *(k for k in shape.separators.values() if k is not None)):
            if (type(key), key) not in before:
                self.schema(key_rule(key))
        value_rule = _VALUE_RULES.get(kind)
        if value_rule is None:
            return
        kept = old.items
        for key, value in shape.items.items():
            if key in kept and _same(kept[key], value):
                continue
            problem = value_rule(key, value)
            if problem is not None:
                self.refuse("schema", problem)

    # -- single objects

    def _check_object(self, record: _Record) -> None:
        kind, owner = record.role  # type: ignore[misc]
        if kind == "root":
            self._check_root(record)
            return
        self._decode(record)
        state = record.new_state
        if kind == "session":
            if not record.is_new:
                self._check_topic_change(record.old_state, state)
                return
            self.schema(records.room_problem(state))
            try:
                self.update.rooms[record.oid] = _room_info(state)
            except (KeyError, AttributeError, TypeError):
                self.refuse("room", "a new room is malformed")
            info = self.update.rooms[record.oid]
            for oid in (info.messages, info.clock, _ref(state, "presence")):
                if oid not in self.records or not self.records[oid].is_new:
                    self.refuse("room", "a new room must bring new trees and a new clock")
        if kind == "user":
            self.schema(records.user_problem(state))
            name = state["name"]
            old = record.old_state.get("name") if isinstance(record.old_state, dict) else name
            if self.enforce_identity and owner != self.identity:
                self.refuse("user", f"user {owner!r} can only be changed by {owner!r}")
            if name != owner or old != owner:
                self.refuse("user", f"user {owner!r} cannot be renamed")
            leases = _ref(state, "leases")
            if record.is_new and leases not in self.records:
                self.refuse("user", "a new user must bring new leases")
            if not record.is_new and leases != _ref(record.old_state, "leases"):
                self.refuse("user", "a user keeps its leases")
            markers = state.get("markers")
            if markers is not None and not (
                isinstance(markers, Ref)
                and (self.index.roles.get(markers.oid) == ("markers", owner)
                     or (markers.oid in self.records and self.records[markers.oid].is_new))
            ):
                self.refuse("user", "a user's markers must be their own ReadMarkers")
        if kind == "markers":
            if self.enforce_identity and owner != self.identity:
                self.refuse("user", f"the read markers of {owner!r} belong to {owner!r}")
            self.schema(records.markers_problem(state))

    def _check_topic_change(self, old: Any, new: Any) -> None:
        """An existing room changes only its topic, to a well-formed one whose time
        is not in the future (and, under TLS, that names the writer)."""
        self.schema(records.room_problem(new))
        if not isinstance(old, dict) or {k: v for k, v in old.items() if k != "topic"} != {
            k: v for k, v in new.items() if k != "topic"
        }:
            self.refuse("room", "an existing room cannot be changed or renamed")
        topic = new.get("topic")
        if topic is None or topic == old.get("topic"):
            return
        _, by, when = topic
        if self.enforce_identity and by != self.identity:
            self.refuse("author", f"{self.identity!r} cannot set a topic as {by!r}")
        if when > self.now + FUTURE_SKEW:
            self.refuse("room", "a topic's time lies in the future")

    def _check_root(self, record: _Record) -> None:
        """chatzeo's root never changes; the ZODB root neither under TLS, and
        without TLS (where applications may keep their own objects beside chatzeo's)
        it keeps its ``chatzeo`` entry."""
        if self.enforce_identity or record.oid != ROOT_OID or self.index.root_oid is None:
            self.refuse("root", "the ZODB root and chatzeo's root cannot be changed")
        try:
            _, state = decode(record.data, lenient=True)
            kept = state["data"][ROOT_KEY] == Ref(self.index.root_oid)
        except (_Undecodable, KeyError, TypeError):
            kept = False
        if not kept:
            self.refuse("root", f"the ZODB root keeps its {ROOT_KEY!r} entry")

    # -- trees

    def _account(self, role: Role, group: _Group) -> None:
        """Sum the item changes of a tree's records; a key that moved is no change."""
        for record in group.records:
            old, new = self._shapes(record)
            if not old.items and not new.items:
                continue
            # Set differences of the item views run in C; what differs is a few items.
            for key, value in old.items.items() - new.items.items():
                other = new.items.get(key, _MISSING)
                if other is _MISSING:
                    group.removed[key] = value
                else:
                    group.changed[key] = (value, other)
            for key, value in new.items.items() - old.items.items():
                if key not in old.items:
                    group.added[key] = value
        for key in list(group.removed.keys() & group.added.keys()):
            before, after = group.removed.pop(key), group.added.pop(key)
            if before != after:
                group.changed[key] = (before, after)

    def _check_group(self, role: Role, group: _Group, clocks: dict[bytes, _Record]) -> None:
        kind, owner = role
        self._check_structure(group)
        written = (*group.added.values(), *(after for _, after in group.changed.values()))
        if kind in ("leases", "presence"):
            # Values are well-formed (`_check_items`); their expiry is bounded here.
            for value in written:
                self.schema(records.expiry_problem(
                    value[1], self.now, self.index.lease_seconds
                ))
        if kind == "leases":
            if self.enforce_identity and owner != self.identity:
                self.refuse("user", f"the leases of user {owner!r} belong to {owner!r}")
            if group.added:
                self._check_lease_count(owner, group)
        elif kind == "presence":
            if self.enforce_identity:
                for value in (*group.removed.values(), *group.added.values(),
                              *(v for pair in group.changed.values() for v in pair)):
                    if not (isinstance(value, tuple) and value and value[0] == self.identity):
                        self.refuse("presence", "a presence entry may only name its writer")
        elif kind in ("rooms", "users", "private"):
            self._check_directory(kind, group)
        elif kind == "messages":
            self._check_messages(owner, group, clocks.get(owner))

    def _check_lease_count(self, owner: str, group: _Group) -> None:
        """A commit that adds a lease leaves its user at most ``max_connections``
        live ones. Counted over the whole leases tree as it will be; an honest one is
        a single small record, so a tree of many buckets is refused outright."""
        tops = [r for r in group.records if not r.class_name.endswith("Bucket")]
        seen: set[bytes] = set()
        live = 0
        todo = [r.oid for r in (tops or group.records)]
        while todo:
            oid = todo.pop()
            if oid in seen:
                continue
            seen.add(oid)
            if len(seen) > _MAX_LEASE_RECORDS:
                self.refuse("schema", f"user {owner!r} holds more leases than chatzeo keeps")
            record = self.records.get(oid)
            if record is not None:
                shape = self._shapes(record)[1]
            else:
                shape = _shape(*self.index.current(self.storage, oid))
            todo.extend(shape.children)
            live += sum(
                1 for value in shape.items.values()
                if type(value) is tuple and len(value) == 2 and value[1] > self.now
            )
        if live > self.index.max_connections:
            self.refuse("schema", (
                f"user {owner!r} would hold {live} live leases; "
                f"the limit is {self.index.max_connections}"
            ))

    def _check_structure(self, group: _Group) -> None:
        dropped: set[bytes] = set()
        linked: set[bytes] = set()
        for record in group.records:
            old, new = self._shapes(record)
            dropped.update(set(old.children) - set(new.children))
            linked.update(set(new.children) - set(old.children))
            for child, key in new.separators.items():
                before = old.separators.get(child, _MISSING)
                if before is _MISSING or key is None or key == before:
                    continue
                # Deleting the key a node routes by moves it up to the child's new
                # smallest key (BTrees does so); any other change misroutes lookups.
                if before is None or not before < key <= self._first_key(child):
                    self.refuse("structure", "a tree node changed the key of a child it kept")
        role = group.records[0].role
        for child in linked - dropped:
            target = self.records.get(child)
            if target is None or not target.is_new or target.role != role:
                self.refuse("structure", "a tree linked an object that is not new to it")
        emptied = set()
        for child in dropped - linked:
            target = self.records.get(child)
            if target is None or target.role != role or not self._shapes(target)[1].empty:
                self.refuse("structure", "a tree unlinked a child that still holds items")
            emptied.add(child)
        chained: set[bytes] = set()
        for record in group.records:
            is_bucket = record.class_name.endswith("Bucket")
            if record.oid in emptied or (record.is_new and is_bucket):
                continue
            old, new = self._shapes(record)
            if old.link == new.link:
                continue
            reached = new.link
            for _ in range(len(self.records) + 1):
                target = self.records.get(reached) if reached else None
                if target is None or not target.is_new or target.role != role:
                    break
                chained.add(target.oid)
                reached = self._shapes(target)[1].link
            expected = old.link
            while expected in emptied:
                expected = self._shapes(self.records[expected])[0].link
            if reached != expected and not record.is_new:
                self.refuse("structure", "a bucket chain skips a bucket that still holds items")
        for record in group.records:
            if record.is_new and record.class_name.endswith("Bucket") and (
                record.oid not in chained
            ):
                self.refuse("structure", "a new bucket is not in its tree's bucket chain")

    def _check_directory(self, kind: str, group: _Group) -> None:
        noun = {"rooms": "room", "users": "user", "private": "private room"}[kind]
        if group.changed:
            self.refuse(noun, f"{noun} {next(iter(group.changed))!r} cannot be replaced")
        if group.removed:
            self.refuse(noun, f"{noun} {next(iter(group.removed))!r} cannot be removed")
        for key, value in group.added.items():
            target = self.records.get(value.oid) if isinstance(value, Ref) else None
            if target is None or not target.is_new:
                self.refuse(noun, f"a new {noun} {key!r} must be a new object")
            assert target is not None
            self._decode(target)
            state = target.new_state
            name = state.get("key" if kind == "private" else "name") if isinstance(
                state, dict) else None
            if name != key:
                self.refuse(noun, f"{noun} {name!r} is filed under another name, {key!r}")
            if kind == "users" and self.enforce_identity and key != self.identity:
                self.refuse("user", f"only {key!r} can create user {key!r}")

    def _check_messages(self, owner: bytes, group: _Group, clock: _Record | None) -> None:
        """A room's tree changes only with its clock, which `_check_clock` checks."""
        if group.changed:
            self.refuse("history", "an existing message cannot be changed")
        if (group.added or group.removed) and clock is None:
            self.refuse("history", "messages were added or removed without the room's clock")

    def _check_clock(self, owner: bytes, clock: _Record, group: _Group) -> None:
        """A room clock and its tree: the clock's pending entries only grow, except
        that a flush moves them unchanged into the tree and retention removes the
        oldest; new messages are the writer's, above the old head and not too far
        ahead; head, count and flushed follow."""
        self._decode(clock)
        room = self.index.rooms.get(owner) or self.update.rooms.get(owner)
        if room is None:
            self.refuse("history", "a room clock was written without its room")
        assert room is not None
        new = clock.new_state
        old: dict[str, Any] = (
            clock.old_state
            if not clock.is_new
            else {"head": 0, "count": 0, "flushed": 0, "total": 0}
        )
        # Keys strictly increase in both (the old one was checked when it was
        # written, unless it came from before this server: then check it now).
        self.schema(records.clock_problem(new, messages=False))
        if not (clock.is_new or clock.old_checked) and records.clock_problem(
            old, messages=False
        ) is not None:
            self.refuse("schema", "the room clock's stored state is malformed; it is read-only")
        old_entries = old.get("pending", ())
        new_entries = new.get("pending", ())
        kept = len(old_entries)
        if (
            not group.added
            and not group.removed
            and new_entries[:kept] == old_entries
            and _int_kinds(new_entries[:kept])
        ):
            # A plain post (every post but a flush or a trim): the old entries stay
            # as they were, in C-speed comparisons, and new ones follow.
            new_pending = dict(new_entries)
            removed: dict[int, Any] = {}
            added = dict(new_entries[kept:])
        else:
            old_pending = dict(old_entries)
            new_pending = dict(new_entries)
            moved: set[int] = set()
            removed = dict(group.removed)
            for key, record in old_pending.items():
                after = new_pending.get(key, group.added.get(key, _MISSING))
                if after is _MISSING:
                    removed[key] = record
                elif after != record or not _same_kind(after, record):
                    self.refuse("history", "an existing message cannot be changed")
                elif key not in new_pending:
                    moved.add(key)
            added = {k: r for k, r in group.added.items() if k not in moved}
            added.update((k, r) for k, r in new_pending.items() if k not in old_pending)
        latest = int((self.now + FUTURE_SKEW) * 1_000_000)
        for key, record in added.items():
            if key <= old["head"]:
                self.refuse("history", "a message was inserted before the room's head")
            if key > latest:
                self.refuse("history", "a message key lies too far in the future")
            problem = records.message_problem(record)
            if problem is not None:
                self.refuse("schema", f"message at key {key}: {problem}")
            if self.enforce_identity and record[1] != self.identity:
                self.refuse("author", f"{self.identity!r} cannot post as {record[1]!r}")
        if group.added:
            top = max(group.added)
            flushed = new.get("flushed")
            if new_pending and min(new_pending) <= top:
                self.refuse("history", "a message was put in the tree above pending ones")
            if not isinstance(flushed, int) or flushed < top:
                self.refuse("history", "a room clock's flushed mark is below its tree's keys")
        elif new.get("flushed") != old.get("flushed"):
            self.refuse("history", "a room clock's flushed mark moved without a flush")
        if removed:
            # The tree as the writer saw it: a tree changes only with its clock, so
            # its revision at the clock's base is the one the writer's view held.
            seen = None if clock.is_new else clock.serial
            self._check_retention(room, sorted(removed), new["count"], new_pending, seen)
        if new["head"] != (max(added) if added else old["head"]):
            self.refuse("history", "a room clock's head must be its newest message's key")
        if new["count"] - old["count"] != len(added) - len(removed):
            self.refuse("history", "a room clock's count does not match its messages")
        # ``total`` moves by exactly the messages added, or (a writer of older code,
        # which does not know it) not at all.
        # From what `RoomClock.posted` read: ``count`` where the total fell behind it.
        before = old.get("total")
        posted = before if type(before) is int and before >= old["count"] else old["count"]
        total = new.get("total")
        if total != before and (type(total) is not int or total - posted != len(added)):
            self.refuse("history", "a room clock's total does not match the messages posted")

    def _check_retention(
        self,
        room: RoomInfo,
        removed: list[int],
        count: int,
        pending: dict[int, Any],
        seen: bytes | None,
    ) -> None:
        """The ``removed`` keys are ones retention removes: older than ``max_age``, or
        below every message that stays while ``max_messages`` do. What stays is the
        writer's ``pending`` and the room's tree as the writer leaves it: its records
        in this commit, the others as of ``seen`` (the base of the writer's clock),
        not as committed since. A commit that flushed the pending entries this one
        trims, from an older view, holds them in the newest tree; judged against that
        tree, an honest trim would look like a deletion of kept messages. Conflict
        resolution refuses such a commit anyway (its clock was flushed meanwhile), as
        a `ConflictError` the writer retries."""
        if room.max_age is not None:
            bound = int((self.now + FUTURE_SKEW - room.max_age) * 1_000_000)
            removed = [key for key in removed if key >= bound]
        if removed and room.max_messages is not None:
            first = self._first_key(room.messages, seen)
            if first is None and pending:
                first = min(pending)
            if count >= room.max_messages and (first is None or removed[-1] < first):
                removed = []
        if removed:
            self.refuse("history", "a message was removed that retention does not remove")

    def _first_key(self, oid: bytes | None, seen: bytes | None = None) -> Any:
        """The smallest key of the tree or bucket ``oid`` once this commit is written:
        its records in this commit, the others as committed, or with ``seen`` as of
        transaction ``seen``."""
        for _ in range(len(self.records) + 2):
            if oid is None:
                return None
            record = self.records.get(oid)
            if record is not None:
                shape = self._shapes(record)[1]
            else:
                shape = _shape(*self.index.current(self.storage, oid, seen))
            if shape.items:
                return min(shape.items)
            oid = shape.link
        return None


def _ref(state: Any, name: str) -> bytes:
    value = state.get(name) if isinstance(state, dict) else None
    if not isinstance(value, Ref):
        raise _Undecodable(f"has no {name}")
    return value.oid


def _check_sorted(shape: _Shape) -> None:
    keys = shape.keys
    try:
        # Distinct (the items dict is as long) and in order: strictly ascending.
        if len(shape.items) != len(keys) or list(keys) != sorted(keys):
            raise _Undecodable("has keys out of order")
    except TypeError:
        raise _Undecodable("has keys that cannot be ordered") from None


def _message_item_problem(key: Any, value: Any) -> str | None:
    problem = records.message_problem(value)
    return None if problem is None else f"message at key {key}: {problem}"


def _prefixed(what: str, rule: Any) -> Any:
    def problem(key: Any) -> str | None:
        found = rule(key)
        return None if found is None else f"{what}: {found}"

    return problem


def _name_rule(kind: str, limit: int) -> Any:
    def problem(key: Any) -> str | None:
        found = records.name_problem(kind, key, limit)
        return None if found is None else f"{kind} name {ascii(key)[:40]}: {found}"

    return problem


# The key rule of each tree kind (`chatzeo.records`): message keys are ints in range,
# presence and lease keys are lease ids, directory keys are names.
_KEY_RULES: dict[str, Any] = {
    "messages": records.key_problem,
    "presence": _prefixed("presence key", records.id_problem),
    "leases": _prefixed("lease key", records.id_problem),
    "rooms": _name_rule("room", records.MAX_ROOM_NAME),
    "users": _name_rule("user", records.MAX_USER_NAME),
}

_VALUE_RULES: dict[str, Any] = {
    "messages": _message_item_problem,
    "presence": records.presence_problem,
    "leases": records.lease_problem,
}


def _same(before: Any, after: Any) -> bool:
    """Equal, and of the same types field by field (``0 == False`` is a change)."""
    if type(before) is not type(after) or before != after:
        return False
    return type(before) is not tuple or all(
        type(x) is type(y) for x, y in zip(before, after, strict=True)
    )


def _int_kinds(entries: Any) -> bool:
    """Every ``(key, record)`` entry's record has an int kind (not a bool or float)."""
    try:
        return all(type(record[3]) is int for _, record in entries)
    except (TypeError, IndexError, KeyError):
        return False


def _same_kind(before: Any, after: Any) -> bool:
    """Two equal message records whose kinds have one type: the one field where ==
    would let a changed type through (ids, authors and texts are strs or None)."""
    try:
        return type(before[3]) is type(after[3])
    except (TypeError, IndexError, KeyError):
        return True  # not message-shaped; == already compared them


# A user's leases tree, in records: one inline bucket holds 30 leases; more than a few
# records means far more leases than the connection limit allows.
_MAX_LEASE_RECORDS = 8
