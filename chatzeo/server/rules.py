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
    Every object of chatzeo's graph has a *role* (`chatzeo.server.index`). A commit
    stores records; each record whose oid has a role, and each new object it links
    into the graph, is decoded with `chatzeo.server.decoding` (nothing is imported
    or called) and compared with the state the writer started from
    (``loadSerial(oid, serial)``, or the index's cache of recent states). Comparing
    with that base, not with the newest state, is what makes the checks hold under
    conflict resolution: BTrees and `RoomClock` merge a writer's *change* into the
    newest state (the clock also raises the keys of the entries it appends), and it
    is that change which is checked. So is retention's "oldest": against the room's
    tree as of the writer's clock base (a tree changes only with its clock), not the
    tree a concurrent flush has since filled with the entries the writer trims.

The rules (each refusal names one; each is the `CommitRules` method of its name;
docs/security.md explains them)
    ``identity``    a certificate without a single commonName changes nothing (TLS).
    ``schema``      every checked record keeps `chatzeo.records`' shape: message
                    tuples, keys (ints in range, in every bucket and node of a message
                    tree), clock fields and its pending bound, room and user fields
                    (no extra attribute), names, presence and lease entries; a lease
                    or presence expiry lies at most the root's ``lease_seconds`` (+
                    `FUTURE_SKEW`) ahead, and a user holds at most the root's
                    ``max_connections`` live leases after any commit that adds one;
                    a record is at most `chatzeo.records.MAX_RECORD_BYTES`.
    ``structure``   in every checked tree, keys are sorted, a child unlinked from a
                    node is emptied in the same commit or linked elsewhere in the same
                    tree, a newly linked child is a new object, a surviving child keeps
                    its separator key (or it rises to the child's first key, as BTrees
                    does when that key is deleted), the bucket chain skips only emptied
                    buckets and takes in every new bucket; a checked object keeps its
                    class, and every record decodes.
    ``root``        the ChatRoot is never changed by a client; the ZODB root neither
                    under TLS, and without TLS it keeps its ``chatzeo`` entry.
    ``room``        an existing ChatSession is never changed (no rename, no new caps)
                    but for its ``topic`` (`chatzeo.records.topic_problem`), whose
                    time lies at most `FUTURE_SKEW` ahead. ChatRoot.rooms only gains
                    keys, each a new ChatSession named like its key, with new trees
                    and a new clock.
    ``user``        a User is never renamed, keeps its leases tree, and its
                    ``markers`` are its own `ReadMarkers` (a new one, or the one it
                    had; `chatzeo.records.markers_problem` for their state); under TLS
                    it, its leases and its markers are changed only by the certificate
                    of the same name, and ChatRoot.users only gains the writer's own
                    new User.
    ``private``     ChatRoot.private only gains keys, each a new `PrivateRoom` filed
                    under its own key (who may write to one is
                    `chatzeo.server.readguard`'s ``private`` rule).
    ``presence``    a presence entry added, changed or removed names the writer (TLS).
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
    ``author``      under TLS, a new message is ``(id, author, text, kind)`` with
                    author = identity (new messages arrive as entries appended to the
                    room clock's ``pending``, or, in a flush, straight into the tree),
                    and a topic set names its writer (anyone may set one, as on IRC
                    without +t: the setter is stored and shown).
    A key that leaves one bucket and appears, with the same record, in another bucket
    of the same tree in the same commit has moved (a split), and is no change at all.

`CommitRules.run` first reads the commit (roles, decoding, every tree's item
changes, every clock's), then applies the rules in the order above; a commit that
breaks several is refused under the first.

Threads: ZEO runs votes in its asyncio loop thread, so `check_commit` runs there,
one commit at a time; the storage's loads are thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ZODB.POSException import ConflictError, POSKeyError

from .. import records
from ..errors import TrustViolation
from ..realm import ROOT_KEY
from ..records import FUTURE_SKEW
from .decoding import (
    EMPTY_SHAPE,
    ROOT_OID,
    Z64,
    Ref,
    Shape,
    Undecodable,
    check_sorted,
    decode,
    shape_of,
)
from .index import CLASSES, TREE_KINDS, IndexUpdate, Role, RoomOwnership, TrustIndex, room_ownership

__all__ = ["RULES", "CommitRules", "check_commit"]

# The rules in the order `CommitRules.run` applies them; each is a method.
RULES = (
    "identity", "schema", "structure", "root", "room", "user", "private", "presence",
    "history", "author",
)

_MISSING = object()
# A user's leases tree, in records: one inline bucket holds 30 leases; more than a few
# records means far more leases than the connection limit allows.
_MAX_LEASE_RECORDS = 8

ProblemRule = Callable[[Any], str | None]


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
    return CommitRules(
        identity if enforce_identity else None,
        stores,
        storage,
        index,
        time.time() if now is None else now,
        enforce_identity=enforce_identity,
    ).run()


# -- what a commit holds ---------------------------------------------------------


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

    @property
    def kind(self) -> str:
        return self.role[0] if self.role else ""

    @property
    def owner(self) -> Any:
        return self.role[1] if self.role else None

    @property
    def is_bucket(self) -> bool:
        return self.class_name.endswith("Bucket")


@dataclass
class _Group:
    """The records of one tree (a room's messages, a user's leases, ...) in a commit,
    and the sum of their item changes."""

    records: list[_Record] = field(default_factory=list)
    removed: dict[Any, Any] = field(default_factory=dict)
    added: dict[Any, Any] = field(default_factory=dict)
    changed: dict[Any, tuple[Any, Any]] = field(default_factory=dict)

    def written(self) -> Iterator[Any]:
        """The values this commit adds or changes."""
        yield from self.added.values()
        yield from (after for _, after in self.changed.values())

    def touched(self) -> Iterator[Any]:
        """Every value this commit adds, changes (before and after) or removes."""
        yield from self.removed.values()
        yield from self.added.values()
        yield from (value for pair in self.changed.values() for value in pair)


@dataclass
class _ClockChange:
    """What a commit does to one room's messages, read from its clock and tree."""

    owner: bytes  # the room's oid
    clock: _Record
    old: dict[str, Any]  # the clock's base state (a fresh clock's for a new one)
    new: dict[str, Any]
    pending: dict[int, Any]  # the clock's pending entries after the commit
    added: dict[int, Any]  # new messages, pending or flushed into the tree
    removed: dict[int, Any]  # messages gone from pending or the tree
    altered: bool  # an existing pending entry was changed


_FRESH_CLOCK = {"head": 0, "count": 0, "flushed": 0, "total": 0}
_NO_TREE = _Group()  # a room's tree this commit does not write; never written to


class CommitRules:
    """The rules one commit must keep (see the module docstring); `run` checks them.

    Each rule of `RULES` is the method of its name, and every refusal it makes
    starts with that name. Reading the commit refuses what cannot be read at all,
    under ``structure`` (a record that does not decode, a checked object replaced
    by another class, an oid reused, one new object linked twice) and ``schema`` (a
    record above `chatzeo.records.MAX_RECORD_BYTES`, before it is decoded).
    """

    def __init__(
        self,
        identity: str | None,
        stores: Iterable[tuple[bytes, bytes, bytes]],
        storage: Any,
        index: TrustIndex,
        now: float,
        *,
        enforce_identity: bool = True,
    ) -> None:
        self.writer = identity
        self.enforce_identity = enforce_identity
        self.storage = storage
        self.index = index
        self.now = now
        self.records = {oid: _Record(oid, serial, data) for oid, serial, data in stores}
        self.update = IndexUpdate()
        self.shapes: dict[bytes, tuple[Shape, Shape]] = {}
        self.objects: dict[str, list[_Record]] = {}  # kind -> the records of single objects
        self.groups: dict[Role, _Group] = {}
        self.trees: dict[str, list[tuple[Any, _Group]]] = {}  # kind -> (owner, its tree)
        self.clocks: dict[bytes, _Record] = {}  # room oid -> its clock's record
        self.changes: dict[bytes, _ClockChange] = {}  # room oid -> what its clock says

    def run(self) -> IndexUpdate:
        """Check every rule; return what the commit adds to the index.

        Raises `TrustViolation` (the first rule broken) or `ConflictError`."""
        try:
            self._assign_roles()
            self._collect()
            for rule in RULES:
                getattr(self, rule)()
        except Undecodable as error:
            raise TrustViolation(f"structure: a record {error}") from None
        except TypeError:  # keys of different types met in a comparison
            raise TrustViolation("structure: a tree holds keys that cannot be compared") from None
        return self.update

    def refuse(self, rule: str, detail: str) -> NoReturn:
        """Refuse the commit under ``rule``."""
        raise TrustViolation(f"{rule}: {detail}")

    # -- reading the commit --------------------------------------------------------

    def _assign_roles(self) -> None:
        """Give each record its role: from the index, or from the checked record
        that links it in (a new object)."""
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
            if record.kind == "root":
                continue  # links nothing chatzeo checks; `root` reads it
            self._decode(record)
            for child, role in self._linked(record):
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

    def _linked(self, record: _Record) -> list[tuple[bytes, Role]]:
        """Objects ``record`` links into the graph, with the role each gets."""
        kind, owner = record.kind, record.owner
        if kind in TREE_KINDS:
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

    def _decode(self, record: _Record) -> None:
        """Decode ``record`` and the state it was written over (its base)."""
        if record.decoded:
            return
        if len(record.data) > records.MAX_RECORD_BYTES:
            # Refused unread: decoding it would cost the server what the limit saves.
            self.refuse("schema", (
                f"a record of {len(record.data)} bytes; the limit is {records.MAX_RECORD_BYTES}"
            ))
        record.class_name, record.new_state = decode(record.data)
        kind = record.kind
        if kind in CLASSES and record.class_name not in CLASSES[kind]:
            self.refuse("structure", f"a {kind} object was replaced by a {record.class_name}")
        self.update.states[record.oid] = (record.class_name, record.new_state, len(record.data))
        if not record.is_new:
            old_class, record.old_state = self._base(record)
            if old_class != record.class_name:
                self.refuse("structure", f"a {old_class} was replaced by a {record.class_name}")
        record.decoded = True

    def _base(self, record: _Record) -> tuple[str, Any]:
        """The decoded state ``record`` was written over; `ConflictError` if packed away."""
        cached = self.index.cached(record.oid, record.serial)
        record.old_checked = self.index.checked(record.oid, record.serial)
        if cached is not None:
            return cached
        try:
            old = self.storage.loadSerial(record.oid, record.serial)
        except POSKeyError:
            raise ConflictError(oid=record.oid, serials=(record.serial,)) from None
        return decode(old)

    def _shapes(self, record: _Record) -> tuple[Shape, Shape]:
        """The old and new `Shape` of a tree record (its keys checked sorted)."""
        shapes = self.shapes.get(record.oid)
        if shapes is None:
            self._decode(record)
            old = EMPTY_SHAPE if record.is_new else shape_of(record.class_name, record.old_state)
            new = shape_of(record.class_name, record.new_state)
            check_sorted(new)
            shapes = self.shapes[record.oid] = (old, new)
        return shapes

    def _collect(self) -> None:
        """Sort the checked records into trees, clocks and single objects, and sum
        each tree's item changes."""
        for record in self.records.values():
            if record.role is None:
                continue
            if record.kind in TREE_KINDS:
                group = self.groups.get(record.role)
                if group is None:
                    group = self.groups[record.role] = _Group()
                    self.trees.setdefault(record.kind, []).append((record.owner, group))
                group.records.append(record)
            elif record.kind == "clock":
                self.clocks[record.owner] = record
            else:
                self.objects.setdefault(record.kind, []).append(record)
        for group in self.groups.values():
            self._account(group)

    def _account(self, group: _Group) -> None:
        """Sum the item changes of a tree's records; a key that moved is no change."""
        for record in group.records:
            old, new = self._shapes(record)
            if old.items or new.items:
                _item_changes(old.items, new.items, group)
        for key in list(group.removed.keys() & group.added.keys()):
            before, after = group.removed.pop(key), group.added.pop(key)
            if before != after:
                group.changed[key] = (before, after)

    def _of_kind(self, kind: str) -> list[_Record]:
        return self.objects.get(kind, [])

    def _groups_of(self, kind: str) -> list[tuple[Any, _Group]]:
        return self.trees.get(kind, [])

    # -- identity ------------------------------------------------------------------

    def identity(self) -> None:
        """Under TLS, a certificate without a single commonName changes nothing."""
        if (
            self.enforce_identity
            and self.writer is None
            and any(r.role for r in self.records.values())
        ):
            self.refuse("identity", "the client certificate names no single commonName")

    # -- schema --------------------------------------------------------------------

    def schema(self) -> None:
        """Every checked record keeps `chatzeo.records`' shapes (module docstring)."""
        for of_kind in self.objects.values():
            for record in of_kind:
                self._schema_object(record)
        for role, group in self.groups.items():
            for record in group.records:
                self._schema_items(record)
            self._schema_expiries(role, group)
        for owner, group in self._groups_of("leases"):
            if group.added:
                self._schema_lease_count(owner, group)
        for owner, clock in self.clocks.items():
            self._schema_clock(owner, clock)

    def _schema_problem(self, problem: str | None) -> None:
        """Refuse under ``schema`` if ``problem`` (a `chatzeo.records` finding)."""
        if problem is not None:
            self.refuse("schema", problem)

    def _schema_object(self, record: _Record) -> None:
        check = _OBJECT_RULES.get(record.kind)
        if check is not None:
            self._schema_problem(check(record.new_state))

    def _schema_items(self, record: _Record) -> None:
        """Every key (and separator) of a written node or bucket has its tree's key
        type, and every value its tree's value shape, unless it is exactly as it
        was stored (an entry an older, unchecking server let in must not keep
        honest writers out of its bucket). "Exactly" compares types too, since
        ``2 == 2.0`` and ``0 == False`` would hide a changed type."""
        key_rule = _KEY_RULES.get(record.kind)
        if key_rule is None:
            return
        old, new = self._shapes(record)
        before = {(type(key), key) for key in (*old.keys, *old.separators.values())}
        for key in (*new.keys, *(k for k in new.separators.values() if k is not None)):
            if (type(key), key) not in before:
                self._schema_problem(key_rule(key))
        value_rule = _VALUE_RULES.get(record.kind)
        if value_rule is None:
            return
        kept = old.items
        for key, value in new.items.items():
            if not (key in kept and _same(kept[key], value)):
                self._schema_problem(value_rule(key, value))

    def _schema_expiries(self, role: Role, group: _Group) -> None:
        """A lease or presence entry written expires at most a lease ahead (its
        shape is `_schema_items`')."""
        if role[0] in ("leases", "presence"):
            lease = self.index.lease_seconds
            for value in group.written():
                self._schema_problem(records.expiry_problem(value[1], self.now, lease))

    def _schema_lease_count(self, owner: str, group: _Group) -> None:
        """A commit that adds a lease leaves its user at most ``max_connections``
        live ones. Counted over the whole leases tree as it will be; an honest one is
        a single small record, so a tree of many buckets is refused outright."""
        tops = [r for r in group.records if not r.is_bucket]
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
            shape = self._shape_after(oid)
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

    def _schema_clock(self, owner: bytes, clock: _Record) -> None:
        """A room clock's fields, and every message it adds, keep their shapes. Keys
        strictly increase in both states (the old one was checked when it was
        written, unless it came from before this server: then it is checked now)."""
        self._schema_problem(records.clock_problem(clock.new_state, messages=False))
        if not (clock.is_new or clock.old_checked) and records.clock_problem(
            clock.old_state, messages=False
        ) is not None:
            self.refuse("schema", "the room clock's stored state is malformed; it is read-only")
        change = self.changes[owner] = self._clock_change(owner, clock)
        for key, record in change.added.items():
            problem = records.message_problem(record)
            if problem is not None:
                self.refuse("schema", f"message at key {key}: {problem}")

    def _clock_change(self, owner: bytes, clock: _Record) -> _ClockChange:
        """What a well-formed clock and its room's tree say this commit does."""
        tree = self.groups.get(("messages", owner), _NO_TREE)
        old: dict[str, Any] = _FRESH_CLOCK if clock.is_new else clock.old_state
        new: dict[str, Any] = clock.new_state
        old_entries = old.get("pending", ())
        new_entries = new.get("pending", ())
        kept = len(old_entries)
        change = _ClockChange(owner, clock, old, new, dict(new_entries), {}, {}, altered=False)
        if (
            not tree.added
            and not tree.removed
            and new_entries[:kept] == old_entries
            and _int_kinds(new_entries[:kept])
        ):
            # A plain post (every post but a flush or a trim): the old entries stay
            # as they were, in C-speed comparisons, and new ones follow.
            change.added = dict(new_entries[kept:])
        else:
            self._clock_entries(change, dict(old_entries), tree)
        return change

    def _clock_entries(self, change: _ClockChange, old_pending: dict[int, Any],
                       tree: _Group) -> None:
        """Pair the clock's old pending entries with what became of each: kept,
        moved unchanged into the tree by a flush, changed, or removed."""
        moved: set[int] = set()
        change.removed = dict(tree.removed)
        for key, record in old_pending.items():
            after = change.pending.get(key, tree.added.get(key, _MISSING))
            if after is _MISSING:
                change.removed[key] = record
            elif after != record or not _same_kind(after, record):
                change.altered = True
            elif key not in change.pending:
                moved.add(key)
        change.added = {k: r for k, r in tree.added.items() if k not in moved}
        change.added.update((k, r) for k, r in change.pending.items() if k not in old_pending)

    # -- structure -----------------------------------------------------------------

    def structure(self) -> None:
        """Every checked tree keeps BTrees' structure (module docstring)."""
        for group in self.groups.values():
            for record in group.records:
                self._structure_separators(record)
            emptied = self._structure_links(group)
            chained = self._structure_chain(group, emptied)
            self._structure_new_buckets(group, chained)

    def _structure_separators(self, record: _Record) -> None:
        """A child a node keeps keeps its separator key, or it rises to the child's
        new smallest key: deleting the key a node routes by moves it up so (BTrees
        does so); any other change misroutes lookups."""
        old, new = self._shapes(record)
        for child, key in new.separators.items():
            before = old.separators.get(child, _MISSING)
            if before is _MISSING or key is None or key == before:
                continue
            if before is None or not before < key <= self._first_key(child):
                self.refuse("structure", "a tree node changed the key of a child it kept")

    def _structure_links(self, group: _Group) -> set[bytes]:
        """A child linked into a node is a new object of the tree, and one unlinked
        (not linked elsewhere in the tree) is emptied; return the emptied ones."""
        dropped: set[bytes] = set()
        linked: set[bytes] = set()
        for record in group.records:
            old, new = self._shapes(record)
            dropped.update(set(old.children) - set(new.children))
            linked.update(set(new.children) - set(old.children))
        role = group.records[0].role
        for child in linked - dropped:
            target = self.records.get(child)
            if target is None or not target.is_new or target.role != role:
                self.refuse("structure", "a tree linked an object that is not new to it")
        emptied = dropped - linked
        for child in emptied:
            target = self.records.get(child)
            if target is None or target.role != role or not self._shapes(target)[1].empty:
                self.refuse("structure", "a tree unlinked a child that still holds items")
        return emptied

    def _structure_chain(self, group: _Group, emptied: set[bytes]) -> set[bytes]:
        """Where a record's next link changed, the new link leads through new
        buckets of the tree to where the old one led past emptied buckets. Return
        the new buckets so reached."""
        chained: set[bytes] = set()
        for record in group.records:
            if record.oid in emptied or (record.is_new and record.is_bucket):
                continue
            old, new = self._shapes(record)
            if old.link == new.link:
                continue
            reached = self._chain_through_new(new.link, record.role, chained)
            expected = old.link
            while expected in emptied:
                expected = self._shapes(self.records[expected])[0].link
            if reached != expected and not record.is_new:
                self.refuse("structure", "a bucket chain skips a bucket that still holds items")
        return chained

    def _chain_through_new(self, link: bytes | None, role: Role | None,
                           chained: set[bytes]) -> bytes | None:
        """Follow ``link`` through new buckets of the tree of ``role``, adding them to
        ``chained``; return the first link that is not one."""
        for _ in range(len(self.records) + 1):
            target = self.records.get(link) if link else None
            if target is None or not target.is_new or target.role != role:
                break
            chained.add(target.oid)
            link = self._shapes(target)[1].link
        return link

    def _structure_new_buckets(self, group: _Group, chained: set[bytes]) -> None:
        for record in group.records:
            if record.is_new and record.is_bucket and record.oid not in chained:
                self.refuse("structure", "a new bucket is not in its tree's bucket chain")

    # -- root ----------------------------------------------------------------------

    def root(self) -> None:
        """chatzeo's root never changes; the ZODB root neither under TLS, and
        without TLS (where applications may keep their own objects beside chatzeo's)
        it keeps its ``chatzeo`` entry."""
        for record in self._of_kind("root"):
            if self.enforce_identity or record.oid != ROOT_OID or self.index.root_oid is None:
                self.refuse("root", "the ZODB root and chatzeo's root cannot be changed")
            try:
                _, state = decode(record.data, lenient=True)
                kept = state["data"][ROOT_KEY] == Ref(self.index.root_oid)
            except (Undecodable, KeyError, TypeError):
                kept = False
            if not kept:
                self.refuse("root", f"the ZODB root keeps its {ROOT_KEY!r} entry")

    # -- room ----------------------------------------------------------------------

    def room(self) -> None:
        """An existing room changes only its topic; a new one is well formed, with
        trees and a clock of its own; ChatRoot.rooms only gains new rooms."""
        for record in self._of_kind("session"):
            if record.is_new:
                self._room_new(record)
            else:
                self._room_kept(record.old_state, record.new_state)
            self._room_topic_time(record)
        for _, group in self._groups_of("rooms"):
            self._directory(group, "room", "room", "name")

    def _room_new(self, record: _Record) -> None:
        state = record.new_state
        try:
            info = self.update.rooms[record.oid] = room_ownership(state)
        except (KeyError, AttributeError, TypeError):
            self.refuse("room", "a new room is malformed")
        for oid in (info.messages, info.clock, _ref(state, "presence")):
            if oid not in self.records or not self.records[oid].is_new:
                self.refuse("room", "a new room must bring new trees and a new clock")

    def _room_kept(self, old: Any, new: Any) -> None:
        if not isinstance(old, dict) or _without_topic(old) != _without_topic(new):
            self.refuse("room", "an existing room cannot be changed or renamed")

    def _room_topic_time(self, record: _Record) -> None:
        topic = _topic_set(record)
        if topic is not None and topic[2] > self.now + FUTURE_SKEW:
            self.refuse("room", "a topic's time lies in the future")

    def _directory(self, group: _Group, rule: str, noun: str, name_field: str) -> None:
        """A directory tree (ChatRoot.rooms, .users, .private) only gains keys, each
        a new object whose ``name_field`` is the key."""
        if group.changed:
            self.refuse(rule, f"{noun} {next(iter(group.changed))!r} cannot be replaced")
        if group.removed:
            self.refuse(rule, f"{noun} {next(iter(group.removed))!r} cannot be removed")
        for key, value in group.added.items():
            target = self.records.get(value.oid) if isinstance(value, Ref) else None
            if target is None or not target.is_new:
                self.refuse(rule, f"a new {noun} {key!r} must be a new object")
            self._decode(target)
            state = target.new_state
            name = state.get(name_field) if isinstance(state, dict) else None
            if name != key:
                self.refuse(rule, f"{noun} {name!r} is filed under another name, {key!r}")

    # -- user ----------------------------------------------------------------------

    def user(self) -> None:
        """A user keeps its name, leases tree and own markers; under TLS only its
        certificate changes it, its leases or its markers, or creates it."""
        for record in self._of_kind("user"):
            self._user_record(record)
        for record in self._of_kind("markers"):
            self._user_owns(record.owner, f"the read markers of {record.owner!r}")
        for owner, _ in self._groups_of("leases"):
            self._user_owns(owner, f"the leases of user {owner!r}")
        for _, group in self._groups_of("users"):
            self._directory(group, "user", "user", "name")
            for key in group.added:
                if self.enforce_identity and key != self.writer:
                    self.refuse("user", f"only {key!r} can create user {key!r}")

    def _user_owns(self, owner: str, what: str) -> None:
        if self.enforce_identity and owner != self.writer:
            self.refuse("user", f"{what} belong to {owner!r}")

    def _user_record(self, record: _Record) -> None:
        owner, state, old_state = record.owner, record.new_state, record.old_state
        old_name = old_state.get("name") if isinstance(old_state, dict) else state["name"]
        if self.enforce_identity and owner != self.writer:
            self.refuse("user", f"user {owner!r} can only be changed by {owner!r}")
        if state["name"] != owner or old_name != owner:
            self.refuse("user", f"user {owner!r} cannot be renamed")
        leases = _ref(state, "leases")
        if record.is_new and leases not in self.records:
            self.refuse("user", "a new user must bring new leases")
        if not record.is_new and leases != _ref(old_state, "leases"):
            self.refuse("user", "a user keeps its leases")
        markers = state.get("markers")
        if markers is not None and not (
            isinstance(markers, Ref)
            and (self.index.roles.get(markers.oid) == ("markers", owner)
                 or (markers.oid in self.records and self.records[markers.oid].is_new))
        ):
            self.refuse("user", "a user's markers must be their own ReadMarkers")

    # -- private -------------------------------------------------------------------

    def private(self) -> None:
        """ChatRoot.private only gains new private rooms, each under its own key."""
        for _, group in self._groups_of("private"):
            self._directory(group, "private", "private room", "key")

    # -- presence ------------------------------------------------------------------

    def presence(self) -> None:
        """Under TLS, a presence entry added, changed or removed names the writer."""
        if not self.enforce_identity:
            return
        for _, group in self._groups_of("presence"):
            for value in group.touched():
                if not (isinstance(value, tuple) and value and value[0] == self.writer):
                    self.refuse("presence", "a presence entry may only name its writer")

    # -- history -------------------------------------------------------------------

    def history(self) -> None:
        """Messages are only appended, flushed unchanged or removed by retention,
        and each room's clock follows (module docstring)."""
        for owner, group in self._groups_of("messages"):
            if group.changed:
                self.refuse("history", "an existing message cannot be changed")
            if (group.added or group.removed) and owner not in self.clocks:
                self.refuse("history", "messages were added or removed without the room's clock")
        for change in self.changes.values():
            room = self.index.rooms.get(change.owner) or self.update.rooms.get(change.owner)
            if room is None:
                self.refuse("history", "a room clock was written without its room")
            if change.altered:
                self.refuse("history", "an existing message cannot be changed")
            self._history_new_keys(change)
            self._history_flush(change)
            if change.removed:
                self._history_retention(room, change)
            self._history_clock_fields(change)

    def _history_new_keys(self, change: _ClockChange) -> None:
        """New keys lie above the room's head and at most `FUTURE_SKEW` ahead."""
        latest = int((self.now + FUTURE_SKEW) * 1_000_000)
        for key in change.added:
            if key <= change.old["head"]:
                self.refuse("history", "a message was inserted before the room's head")
            if key > latest:
                self.refuse("history", "a message key lies too far in the future")

    def _history_flush(self, change: _ClockChange) -> None:
        """Messages put in the tree lie below the pending ones and at most at the
        clock's ``flushed`` mark, which moves only with them."""
        into_tree = self.groups.get(("messages", change.owner), _NO_TREE).added
        flushed = change.new.get("flushed")
        if into_tree:
            top = max(into_tree)
            if change.pending and min(change.pending) <= top:
                self.refuse("history", "a message was put in the tree above pending ones")
            if not isinstance(flushed, int) or flushed < top:
                self.refuse("history", "a room clock's flushed mark is below its tree's keys")
        elif flushed != change.old.get("flushed"):
            self.refuse("history", "a room clock's flushed mark moved without a flush")

    def _history_retention(self, room: RoomOwnership, change: _ClockChange) -> None:
        """The removed keys are ones retention removes: older than ``max_age``, or
        below every message that stays while ``max_messages`` do. What stays is the
        writer's pending entries and the room's tree as the writer leaves it: its
        records in this commit, the others as of the base of the writer's clock,
        not as committed since. A commit that flushed the pending entries this one
        trims, from an older view, holds them in the newest tree; judged against that
        tree, an honest trim would look like a deletion of kept messages. Conflict
        resolution refuses such a commit anyway (its clock was flushed meanwhile), as
        a `ConflictError` the writer retries."""
        removed = sorted(change.removed)
        if room.max_age is not None:
            bound = int((self.now + FUTURE_SKEW - room.max_age) * 1_000_000)
            removed = [key for key in removed if key >= bound]
        if removed and room.max_messages is not None:
            # A tree changes only with its clock, so its revision at the clock's
            # base is the one the writer's view held.
            seen = None if change.clock.is_new else change.clock.serial
            first = self._first_key(room.messages, seen)
            if first is None and change.pending:
                first = min(change.pending)
            if change.new["count"] >= room.max_messages and (
                first is None or removed[-1] < first
            ):
                removed = []
        if removed:
            self.refuse("history", "a message was removed that retention does not remove")

    def _history_clock_fields(self, change: _ClockChange) -> None:
        """The clock's head is its newest key; its count moves by the messages added
        less those removed, its ``total`` by the messages added (or, written by
        older code that does not know it, not at all)."""
        old, new, added = change.old, change.new, change.added
        if new["head"] != (max(added) if added else old["head"]):
            self.refuse("history", "a room clock's head must be its newest message's key")
        if new["count"] - old["count"] != len(added) - len(change.removed):
            self.refuse("history", "a room clock's count does not match its messages")
        # From what `RoomClock.posted` read: ``count`` where the total fell behind it.
        before = old.get("total")
        posted = before if type(before) is int and before >= old["count"] else old["count"]
        total = new.get("total")
        if total != before and (type(total) is not int or total - posted != len(added)):
            self.refuse("history", "a room clock's total does not match the messages posted")

    # -- author --------------------------------------------------------------------

    def author(self) -> None:
        """Under TLS, every new message is the writer's, and so is every topic set."""
        if not self.enforce_identity:
            return
        for change in self.changes.values():
            for record in change.added.values():
                if record[1] != self.writer:
                    self.refuse("author", f"{self.writer!r} cannot post as {record[1]!r}")
        for room in self._of_kind("session"):
            topic = _topic_set(room)
            if topic is not None and topic[1] != self.writer:
                self.refuse("author", f"{self.writer!r} cannot set a topic as {topic[1]!r}")

    # -- shared reads --------------------------------------------------------------

    def _shape_after(self, oid: bytes, seen: bytes | None = None) -> Shape:
        """The shape of ``oid`` once this commit is written: its record in this
        commit, else as committed (with ``seen``, as of transaction ``seen``)."""
        record = self.records.get(oid)
        if record is not None:
            return self._shapes(record)[1]
        return shape_of(*self.index.current(self.storage, oid, seen))

    def _first_key(self, oid: bytes | None, seen: bytes | None = None) -> Any:
        """The smallest key of the tree or bucket ``oid`` once this commit is written
        (see `_shape_after`)."""
        for _ in range(len(self.records) + 2):
            if oid is None:
                return None
            shape = self._shape_after(oid, seen)
            if shape.items:
                return min(shape.items)
            oid = shape.link
        return None


# -- helpers -----------------------------------------------------------------------


def _item_changes(old: dict[Any, Any], new: dict[Any, Any], group: _Group) -> None:
    """Add what differs between one record's old and new items to ``group``."""
    gone: Iterable[tuple[Any, Any]]
    came: Iterable[tuple[Any, Any]]
    try:
        # Set differences of the item views run in C; what differs is a few items.
        gone = old.items() - new.items()
        came = new.items() - old.items()
    except TypeError:  # an unhashable value: the schema rule names it
        gone = [(k, v) for k, v in old.items() if new.get(k, _MISSING) != v]
        came = [(k, v) for k, v in new.items() if old.get(k, _MISSING) != v]
    for key, value in gone:
        other = new.get(key, _MISSING)
        if other is _MISSING:
            group.removed[key] = value
        else:
            group.changed[key] = (value, other)
    for key, value in came:
        if key not in old:
            group.added[key] = value


def _ref(state: Any, name: str) -> bytes:
    value = state.get(name) if isinstance(state, dict) else None
    if not isinstance(value, Ref):
        raise Undecodable(f"has no {name}")
    return value.oid


def _without_topic(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != "topic"}


def _topic_set(record: _Record) -> tuple[str, str, float] | None:
    """The topic ``record`` (a ChatSession whose schema passed) sets, if it sets one."""
    topic: tuple[str, str, float] | None = record.new_state.get("topic")
    before = None if record.is_new else record.old_state.get("topic")
    return None if topic is None or topic == before else topic


def _message_item_problem(key: Any, value: Any) -> str | None:
    problem = records.message_problem(value)
    return None if problem is None else f"message at key {key}: {problem}"


def _prefixed(what: str, rule: ProblemRule) -> ProblemRule:
    def problem(key: Any) -> str | None:
        found = rule(key)
        return None if found is None else f"{what}: {found}"

    return problem


def _name_rule(kind: str, limit: int) -> ProblemRule:
    def problem(key: Any) -> str | None:
        found = records.name_problem(kind, key, limit)
        return None if found is None else f"{kind} name {ascii(key)[:40]}: {found}"

    return problem


# The key rule of each tree kind (`chatzeo.records`): message keys are ints in range,
# presence and lease keys are lease ids, directory keys are names.
_KEY_RULES: dict[str, ProblemRule] = {
    "messages": records.key_problem,
    "presence": _prefixed("presence key", records.id_problem),
    "leases": _prefixed("lease key", records.id_problem),
    "rooms": _name_rule("room", records.MAX_ROOM_NAME),
    "users": _name_rule("user", records.MAX_USER_NAME),
}

_VALUE_RULES: dict[str, Callable[[Any, Any], str | None]] = {
    "messages": _message_item_problem,
    "presence": records.presence_problem,
    "leases": records.lease_problem,
}

# The schema of each single object's state (a clock's is `_schema_clock`'s).
_OBJECT_RULES: dict[str, ProblemRule] = {
    "session": records.room_problem,
    "user": records.user_problem,
    "markers": records.markers_problem,
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
