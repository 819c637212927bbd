"""Read isolation: `chatzeo serve` serves a private room's objects to its members only.

The index
    `ReadIndex` knows, for every object of every private room (`chatzeo.privacy`:
    the `PrivateRoom` record, its session, the session's clock, the nodes and
    buckets of its message and presence trees), which room it belongs to, and each
    room's members. It is built by walking ``ChatRoot.private`` when the server
    starts and grows at each commit: a new object (stored with serial zero)
    referenced from an object of room R in the same commit joins R. Only new
    objects are ever claimed, so no commit can pull an existing (say, a public)
    object into a room, and an object never leaves its room: the index only grows.
    References are read with `ZODB.serialize.referencesf`, which imports nothing;
    the `PrivateRoom` records are decoded with `chatzeo.server.decoding.decode` (allowlisted,
    nothing imported or called).

What a connection may not do (`ReadGuard`, a mixin of ZEO's per-connection handler)
    * load an object of a room its certificate is not a member of, whatever the
      call (``loadBefore``, ``loadSerial``, ``history``, the record iterator;
      ``record_iternext``, a walk of the whole storage, is refused outright),
      whether it saw the oid before or guesses it: the answer is `POSKeyError`,
      the same as for an oid that does not exist, so a refusal does not even
      confirm that the object exists;
    * hear of a change to such an object: the oids are dropped from every
      invalidation it is sent, and from the ``getInvalidations`` answer it gets when
      it reconnects with a cache;
    * write such an object (refused at the vote as ``private: ...``), or change a
      `PrivateRoom` otherwise than `chatzeo.privacy.access_problem` allows;
    * connect at all with a revoked certificate (`chatzeo.server.identity.Revocations`,
      checked when the connection is made and, for open connections, about once a
      second: a revoked certificate's connections are closed).
    A membership change takes effect when its commit is finished, for open
    connections too: the next load is checked against the new members. The
    connections of every user who joined or left the room are also sent an
    invalidation of all of the room's objects, so that a member who left drops
    what it cached, and one who joins again does not trust a copy cached before
    it left (it heard of no change meanwhile).

Threads: ZEO's event loop runs every handler method, the periodic revocation check
and the index updates, one at a time; nothing here is called from another thread.
Compose with other handler classes through `install_read_guard`, after them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ZODB.POSException import POSKeyError
from ZODB.serialize import referencesf

from ..errors import TrustViolation
from ..privacy import access_problem
from .decoding import Ref, decode
from .identity import Revocations

__all__ = [
    "ReadIndex",
    "ReadGuard",
    "install_read_guard",
    "install_revocation_check",
    "check_private_commit",
]

log = logging.getLogger(__name__)

Z64 = b"\0" * 8
_ACCESS_CLASS = "chatzeo.privacy.PrivateRoom"
# The key of a fan-out push inside an ``info`` message (chatzeo.server.fanout.PUSH).
_PUSH = "chatzeo_push"
# How often open connections are checked against the revocation list (seconds).
REVOCATION_POLL = 1.0


@dataclass
class RoomAccess:
    """One private room as the server knows it."""

    members: frozenset[str]
    owner: str
    oids: set[bytes] = field(default_factory=set)


class ReadIndex:
    """Which private room each object belongs to, and who may read it."""

    def __init__(self) -> None:
        self.rooms: dict[bytes, RoomAccess] = {}  # PrivateRoom oid -> access
        self.room_of: dict[bytes, bytes] = {}  # object oid -> PrivateRoom oid
        self.directory: set[bytes] = set()  # nodes and buckets of ChatRoot.private

    # -- reading

    def readable(self, identity: str | None, oid: bytes) -> bool:
        room = self.room_of.get(oid)
        return room is None or (identity is not None and identity in self.rooms[room].members)

    def visible(self, identity: str | None, oids: Iterable[bytes]) -> list[bytes]:
        room_of = self.room_of
        return [oid for oid in oids if oid not in room_of or self.readable(identity, oid)]

    # -- building

    @classmethod
    def build(cls, storage: Any) -> ReadIndex:
        """Walk ``ChatRoot.private`` in ``storage`` (absent: an empty index)."""
        index = cls()
        directory = _private_directory(storage)
        if directory is None:
            return index
        pending = [directory]
        while pending:
            oid = pending.pop()
            if oid in index.directory or oid in index.room_of:
                continue
            data, _ = storage.load(oid)
            class_name, state = decode(data)
            if class_name == _ACCESS_CLASS:
                index._add_room(oid, state, storage)
            else:
                index.directory.add(oid)
                pending.extend(referencesf(data))
        return index

    def _add_room(self, oid: bytes, state: Any, storage: Any = None,
                  new: dict[bytes, bytes] | None = None) -> None:
        """Register the room whose `PrivateRoom` record is ``oid``, and its objects:
        from ``storage`` (at start) or from ``new``, the new records of a commit."""
        if not isinstance(state, dict):
            return
        members = state.get("members")
        access = RoomAccess(
            frozenset(m for m in members if isinstance(m, str))
            if isinstance(members, tuple) else frozenset(),
            str(state.get("owner")),
        )
        self.rooms[oid] = access
        self._claim(oid, oid, storage, new)

    def _claim(self, oid: bytes, room: bytes, storage: Any = None,
               new: dict[bytes, bytes] | None = None) -> None:
        """Give ``oid`` and what it references (not yet claimed) to ``room``."""
        pending = [oid]
        access = self.rooms[room]
        while pending:
            current = pending.pop()
            if current != oid and (current in self.room_of or current in self.directory):
                continue
            if new is not None:
                data = new.get(current)
                if data is None:
                    continue  # an existing object: never claimed by a commit
            else:
                try:
                    data, _ = storage.load(current)
                except POSKeyError:
                    continue
            self.room_of[current] = room
            access.oids.add(current)
            pending.extend(referencesf(data))

    # -- growing, once a commit is finished

    def apply(self, stores: Iterable[tuple[bytes, bytes, bytes]]) -> dict[bytes, set[str]]:
        """Take in a finished commit's ``(oid, serial, data)`` stores; return, per
        private room whose members changed, the names that joined or left."""
        stores = list(stores)
        new = {oid: data for oid, serial, data in stores if serial == Z64}
        changed: dict[bytes, set[str]] = {}
        for oid, serial, data in stores:
            room = self.room_of.get(oid)
            if room is not None and room == oid and serial != Z64:
                _, state = decode(data)
                members = state.get("members") if isinstance(state, dict) else None
                if isinstance(members, tuple):
                    access = self.rooms[room]
                    after = frozenset(m for m in members if isinstance(m, str))
                    if after != access.members:
                        changed[room] = set(after ^ access.members)
                        access.members = after
            if room is not None:
                for child in referencesf(data):
                    if child in new and child not in self.room_of:
                        self._claim(child, room, new=new)
            elif oid in self.directory:
                for child in referencesf(data):
                    if child not in new or child in self.room_of or child in self.directory:
                        continue
                    class_name, state = decode(new[child])
                    if class_name == _ACCESS_CLASS:
                        self._add_room(child, state, new=new)
                    else:
                        self.directory.add(child)
        return changed


def _private_directory(storage: Any) -> bytes | None:
    try:
        _, root = decode(storage.load(Z64)[0])
        chat_root = root.get("data", {}).get("chatzeo") if isinstance(root, dict) else None
        if not isinstance(chat_root, Ref):
            return None
        _, state = decode(storage.load(chat_root.oid)[0])
    except POSKeyError:
        return None
    private = state.get("private") if isinstance(state, dict) else None
    return private.oid if isinstance(private, Ref) else None


def check_private_commit(
    index: ReadIndex, identity: str | None, stores: Iterable[tuple[bytes, bytes, bytes]],
    load_serial: Callable[[bytes, bytes], bytes],
) -> None:
    """Refuse (`TrustViolation`, rule ``private``) a commit that writes an object
    of a private room its writer is not a member of, links into ``ChatRoot.private``
    anything but a new `PrivateRoom` (or the directory's own new nodes), or writes a
    `PrivateRoom` state that `chatzeo.privacy.access_problem` refuses."""
    stores = list(stores)
    data_of = {oid: data for oid, _, data in stores}
    new = {oid for oid, serial, _ in stores if serial == Z64}
    directory = [oid for oid in data_of if oid in index.directory]
    for oid, serial, data in stores:
        room = index.room_of.get(oid)
        if room is not None and not index.readable(identity, oid):
            raise TrustViolation("private: only the members of a private room write to it")
        if room == oid:
            class_name, state = _decoded(data)
            old_class, old = _decoded(load_serial(oid, serial))
            if class_name != _ACCESS_CLASS or old_class != _ACCESS_CLASS:
                raise TrustViolation("private: a private room was replaced by another record")
            _check_access(identity, old, state, new)
    # What the directory links that is new: its own new nodes, or new private rooms.
    seen: set[bytes] = set()
    while directory:
        for child in referencesf(data_of[directory.pop()]):
            if child not in new or child in seen:
                continue
            seen.add(child)
            class_name, state = _decoded(data_of[child])
            if class_name in _DIRECTORY_CLASSES:
                directory.append(child)
            elif class_name == _ACCESS_CLASS:
                _check_access(identity, None, state, new)
            else:
                raise TrustViolation("private: the directory of private rooms holds "
                                     "only private rooms")


_DIRECTORY_CLASSES = ("BTrees.OOBTree.OOBTree", "BTrees.OOBTree.OOBucket")


def _decoded(data: bytes) -> tuple[str, Any]:
    try:
        return decode(data)
    except Exception:
        raise TrustViolation("private: a private room record is malformed") from None


def _check_access(identity: str | None, old: Any, state: Any, new: set[bytes]) -> None:
    session = state.get("session") if isinstance(state, dict) else None
    problem = access_problem(identity, old, state, getattr(session, "oid", None) in new)
    if problem is not None:
        raise TrustViolation(f"private: {problem}")


class ReadGuard:
    """A cooperative mixin for ZEO's per-connection handler; see the module docstring.

    It expects ``self.peercert`` and ``self.identity`` (the certificate and its
    name, read by `chatzeo.server.protocol.ChatZEOStorage.notify_connected`) and the
    shared `_ReadState` in ``self._reads``, which `install_read_guard` gives every
    new handler.
    """

    _reads: _ReadState
    peercert: dict[str, Any] | None
    identity: str | None
    _read_stores: list[tuple[bytes, bytes, bytes]]
    _read_checked: list[bytes]

    # -- connecting

    def notify_connected(self, conn: Any) -> None:
        super().notify_connected(conn)  # type: ignore[misc]
        reads = self._reads
        reads.connections.add(self)
        for name in ("async_", "async_threadsafe"):
            send = getattr(self, name, None)
            if send is not None:
                setattr(self, name, self._filtered(send))

    def register(self, storage_id: str, read_only: bool) -> Any:
        # Refused here rather than by closing in notify_connected: the client hears
        # why, closes, and ZEO's own disconnect bookkeeping runs as usual.
        revocations = self._reads.revocations
        revocations.refresh()
        if revocations.is_revoked(self.peercert):
            log.warning("refused a revoked certificate (%r) from %s",
                        getattr(self, "identity", None), getattr(self, "log_label", "?"))
            raise TrustViolation("identity: this certificate was revoked")
        return super().register(storage_id, read_only)  # type: ignore[misc]

    def notify_disconnected(self) -> None:
        self._reads.connections.discard(self)
        super().notify_disconnected()  # type: ignore[misc]

    def _filtered(self, send: Callable[..., Any]) -> Callable[..., Any]:
        def filtered(method: str, *args: Any) -> Any:
            index = self._reads.index
            if method == "invalidateTransaction" and len(args) == 2:
                tid, oids = args
                args = (tid, self._visible_oids(tid, oids))
            elif method == "info" and len(args) == 1 and isinstance(args[0], dict) and (
                _PUSH in args[0]
            ):
                # Fan-out (chatzeo.server.fanout) carries new states with the oids: a
                # non-member must get neither (a member removed while its client
                # still asks for the room's clock, say).
                tid, oids, carried = args[0][_PUSH]
                oids = self._visible_oids(tid, oids)
                carried = [(oid, data) for oid, data in carried
                           if index.readable(self.identity, oid)]
                if carried:
                    args = ({**args[0], _PUSH: (tid, oids, carried)},)
                else:
                    method, args = "invalidateTransaction", (tid, oids)
            return send(method, *args)

        return filtered

    def _visible_oids(self, tid: bytes, oids: Iterable[bytes]) -> list[bytes]:
        visible = self._reads.index.visible(self.identity, oids)
        extra = self._reads.extra.get(tid, {}).pop(self, None)
        return [*visible, *extra] if extra else visible

    # -- reading

    def _check_read(self, oid: bytes) -> None:
        if not self._reads.index.readable(self.identity, oid):
            raise POSKeyError(oid)

    def loadBefore(self, oid: bytes, tid: bytes) -> Any:  # noqa: N802 (ZEO's name)
        self._check_read(oid)
        return super().loadBefore(oid, tid)  # type: ignore[misc]

    def history(self, tid: bytes, size: int = 1) -> Any:
        self._check_read(tid)  # ZEO names the oid ``tid`` here
        return super().history(tid, size)  # type: ignore[misc]

    def setup_delegation(self) -> None:
        super().setup_delegation()  # type: ignore[misc]
        # ZEO binds these straight to the storage, per connection: wrap the bindings.
        load_serial = getattr(self, "loadSerial", None)
        if load_serial is not None:
            def guarded_load_serial(oid: bytes, serial: bytes) -> Any:
                self._check_read(oid)
                return load_serial(oid, serial)

            self.loadSerial = guarded_load_serial
        if getattr(self, "record_iternext", None) is not None:
            def refused_record_iternext(next: bytes | None = None) -> Any:
                # It walks every record of the storage; chatzeo's clients never call it.
                raise POSKeyError(next or Z64)

            self.record_iternext = refused_record_iternext

    def iterator_record_next(self, iid: Any) -> Any:
        while True:
            item = super().iterator_record_next(iid)  # type: ignore[misc]
            if item is None or self._reads.index.readable(self.identity, item[0]):
                return item

    def getInvalidations(self, tid: bytes) -> Any:  # noqa: N802 (ZEO's name)
        result = super().getInvalidations(tid)  # type: ignore[misc]
        if result is None:
            return None
        last, oids = result
        return last, self._reads.index.visible(self.identity, oids)

    # -- writing

    def tpc_begin(self, id: Any, *args: Any, **kw: Any) -> Any:
        fresh = getattr(self, "transaction", None) is None
        result = super().tpc_begin(id, *args, **kw)  # type: ignore[misc]
        if fresh:
            self._read_stores = []
            self._read_checked = []
        return result

    def checkCurrentSerialInTransaction(  # noqa: N802 (ZEO's name)
        self, oid: bytes, serial: bytes, id: Any
    ) -> Any:
        # Its answer (a conflict naming the current serial) would tell a non-member
        # when a private object last changed: checked at the vote like a write.
        result = super().checkCurrentSerialInTransaction(oid, serial, id)  # type: ignore[misc]
        if getattr(self, "transaction", None) is not None:
            self._read_checked.append(oid)
        return result

    def storea(self, oid: bytes, serial: bytes, data: bytes, id: Any) -> Any:
        result = super().storea(oid, serial, data, id)  # type: ignore[misc]
        if getattr(self, "transaction", None) is not None:
            self._read_stores.append((oid, serial, data))
        return result

    def _vote(self, delay: Any = None) -> Any:
        if self.connected and self.transaction is not None:  # type: ignore[attr-defined]
            try:
                index = self._reads.index
                if not all(index.readable(self.identity, oid) for oid in self._read_checked):
                    raise TrustViolation("private: only the members of a private room read it")
                check_private_commit(
                    index, self.identity, self._read_stores,
                    self.storage.loadSerial,  # type: ignore[attr-defined]
                )
            except TrustViolation as refusal:
                log.warning("refused a commit from %s (certificate %r): %s",
                            self.log_label, self.identity, refusal)  # type: ignore[attr-defined]
                self._clear_transaction()
                raise
        return super()._vote(delay)  # type: ignore[misc]

    def _invalidate(self, tid: bytes) -> Any:
        # Called by the storage inside tpc_finish, before anyone hears of ``tid``:
        # the index must know the new objects and members first.
        reads = self._reads
        changed = reads.index.apply(self._read_stores)
        self._read_stores = []
        affected: dict[Any, list[bytes]] = {}
        for room, names in changed.items():
            oids = sorted(reads.index.rooms[room].oids)
            for zs in reads.connections:
                if zs is not self and zs.identity in names:
                    affected.setdefault(zs, []).extend(oids)
        if affected:
            reads.extra[tid] = affected
        try:
            return super()._invalidate(tid)  # type: ignore[misc]
        finally:
            # Connections the server's invalidation skipped still hear of the rooms.
            for zs, oids in reads.extra.pop(tid, {}).items():
                zs._unfiltered_invalidate(tid, oids)

    def _unfiltered_invalidate(self, tid: bytes, oids: list[bytes]) -> None:
        send = self._reads_raw_send
        if send is not None:
            send("invalidateTransaction", tid, oids)

    @property
    def _reads_raw_send(self) -> Callable[..., Any] | None:
        connection = getattr(self, "connection", None)
        return getattr(connection, "async_", None)

    def _clear_transaction(self) -> None:
        self._read_stores = []
        self._read_checked = []
        super()._clear_transaction()  # type: ignore[misc]


@dataclass
class _ReadState:
    index: ReadIndex
    revocations: Revocations
    connections: set[Any] = field(default_factory=set)
    # tid -> connection -> oids it must also hear of at that tid (members changed)
    extra: dict[bytes, dict[Any, list[bytes]]] = field(default_factory=dict)


def _poll_revocations(server: Any, state: _ReadState) -> None:
    """About once a second, close the open connections of revoked certificates."""
    loop = getattr(getattr(server, "acceptor", None), "event_loop", None)
    if loop is None:
        return
    revocations = state.revocations

    def poll() -> None:
        try:
            if revocations.refresh():
                for zs in list(state.connections):
                    if revocations.is_revoked(zs.peercert):
                        log.warning("closing %s: certificate %r was revoked",
                                    zs.log_label, zs.identity)
                        _drop(zs)
        finally:
            loop.call_later(REVOCATION_POLL, poll)

    loop.call_soon(poll)


def _drop(zs: Any) -> None:
    """Close ``zs``'s connection from the server's side. ZEO's close marks the
    protocol closed first, so its ``connection_lost`` skips ``notify_disconnected``
    (docs/operations.md): call it here, so that an open transaction is aborted and
    the connection leaves the server's lists."""
    connection = zs.connection
    try:
        if zs.connected:
            zs.notify_disconnected()
    finally:
        if connection is not None:
            connection.close()


class _RevocationOnly(ReadGuard):
    """`ReadGuard`'s revocation check without its read checks (``--private-rooms
    off``): every object is readable, no invalidation is filtered."""

    def _check_read(self, oid: bytes) -> None:
        pass

    def _filtered(self, send: Callable[..., Any]) -> Callable[..., Any]:
        return send

    def getInvalidations(self, tid: bytes) -> Any:  # noqa: N802 (ZEO's name)
        return super(ReadGuard, self).getInvalidations(tid)  # type: ignore[misc]

    def iterator_record_next(self, iid: Any) -> Any:
        return super(ReadGuard, self).iterator_record_next(iid)  # type: ignore[misc]

    def loadBefore(self, oid: bytes, tid: bytes) -> Any:  # noqa: N802 (ZEO's name)
        return super(ReadGuard, self).loadBefore(oid, tid)  # type: ignore[misc]

    def _vote(self, delay: Any = None) -> Any:
        return super(ReadGuard, self)._vote(delay)  # type: ignore[misc]

    def _invalidate(self, tid: bytes) -> Any:
        self._read_stores = []
        return super(ReadGuard, self)._invalidate(tid)  # type: ignore[misc]


def install_revocation_check(server: Any, revocations: Revocations) -> None:
    """Refuse and close revoked certificates' connections, without read checks."""
    state = _ReadState(ReadIndex(), revocations)
    revocations.refresh()
    _install(server, state, _RevocationOnly)
    _poll_revocations(server, state)


def _install(server: Any, state: _ReadState, mixin: type) -> None:
    create = server.create_client_handler
    classes: dict[type, type] = {}

    def create_client_handler() -> Any:
        handler = create()
        base = type(handler)
        if base not in classes:
            classes[base] = base if issubclass(base, mixin) else type(
                f"{mixin.__name__.strip('_')}{base.__name__}", (mixin, base), {})
        # Same instance layout, one more base: safe to re-class (as fanout does).
        handler.__class__ = classes[base]
        handler._reads = state
        handler._read_stores = []
        handler._read_checked = []
        return handler

    server.create_client_handler = create_client_handler


def install_read_guard(server: Any, storage: Any, revocations: Revocations) -> ReadIndex:
    """Make every new connection handler of ``server`` (ZEO's `StorageServer`) a
    `ReadGuard` over ``storage``, whatever class the server made it before (call
    after the commit guard and any other handler change), and start the periodic
    revocation check. Call before the server loops."""
    state = _ReadState(ReadIndex.build(storage), revocations)
    revocations.refresh()
    _install(server, state, ReadGuard)
    _poll_revocations(server, state)
    log.info("private rooms are read by their members only (%d rooms, %d objects)",
             len(state.index.rooms), len(state.index.room_of))
    return state.index
