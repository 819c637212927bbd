"""`ChatClient`: one participant's view of the chat, as the command line and the terminal use it.

It owns one ZODB connection with its own transaction manager, a `ChangeFeed` on
the current room, and (for a named user) a presence lease renewed by `heartbeat`.
Every write (joining, posting, renewing) runs in its own retried transaction
(`chatzeo.retry`); reads happen in the client's connection, refreshed by `receive`.

Threads: a `ChatClient` belongs to the thread that created it, except `wake`, which
any thread may call to end a `wait` early.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import transaction
from ZODB.POSException import POSKeyError, ReadConflictError, StateLoadError

from .delivery import ChangeFeed
from .errors import ChatError, InvalidInput, NoSuchRoom, UnsafeRecord
from .message import Message, MessageKind, new_message_id
from .privacy import NotOwner, PrivateRoom, PrivateRoomsNeedTLS, new_key
from .realm import ChatRoot, get_root
from .records import MAX_ROOM_NAME, name_problem
from .retry import DEFAULT_POLICY, RetryPolicy, run_in_transaction
from .session import ChatSession
from .validation import check_room_name, check_user_name

__all__ = ["ChatClient", "RoomInfo", "AmbiguousRoom", "MALFORMED_ROOM", "NotAMember", "NotOwner"]

# What `ChatClient.rooms` lists for a room entry that breaks the rules.
MALFORMED_ROOM = "[malformed room]"

RoomInfo = tuple[str, int]
T = TypeVar("T")

log = logging.getLogger(__name__)


class NotAMember(ChatError, LookupError):
    """A private room this user is not (or no longer) a member of, or no such room:
    the server answers both alike."""


class AmbiguousRoom(InvalidInput):
    """A room name matches, without regard to case, several rooms and none exactly
    (a database from before names were matched so may hold ``Dev`` and ``dev``)."""

    def __init__(self, name: str, matches: list[str]):
        self.name = name
        self.matches = matches
        super().__init__(
            f"{name!r} matches several rooms: {', '.join(matches)}; type the exact name"
        )


class ChatClient:
    """A user (or an anonymous reader, ``user=None``) talking in one room at a time."""

    def __init__(
        self,
        db: Any,
        user: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
        policy: RetryPolicy = DEFAULT_POLICY,
        notify: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.user = check_user_name(user) if user is not None else None
        self.lease_id = new_message_id()
        self.clock = clock
        self.policy = policy
        self.room: ChatSession | None = None
        # The private room (or direct conversation) being talked in, if any.
        self.private: PrivateRoom | None = None
        self._private_shown = ""
        # Whether this connection proves a name with a TLS client certificate: only
        # then does the server keep private rooms private (chatzeo.readguard).
        self.certified = bool(getattr(getattr(db, "storage", None), "_chatzeo_ssl", False))
        self._manager = transaction.TransactionManager()
        self._connection = db.open(transaction_manager=self._manager)
        self.feed = ChangeFeed(db, notify)
        self._connected = False
        try:
            if user is not None:
                name = check_user_name(user)
                self._write(
                    lambda root: root.connect(name, self.lease_id, self.clock()),
                    f"connecting user {name!r}",
                )
                self._connected = True
        except BaseException:
            self.close()
            raise

    # -- rooms -----------------------------------------------------------------

    def join(self, room_name: str, history: int = 50, create: bool = True) -> list[Message]:
        """Enter ``room_name``, leaving the current room.

        Room names match without regard to case (``Dev`` finds ``dev``; `find_room`
        says how). Returns its latest ``history`` messages; `receive` then returns
        only what comes after them. A missing room is created, or with
        ``create=False`` refused with `NoSuchRoom`.
        """
        if room_name.startswith("@"):
            return self.query(room_name[1:], history=history, create=create)
        name = check_room_name(room_name)
        self._catch_up()
        self._manager.begin()
        private = self._find_private(name)
        if private is not None:
            return self._enter_private(private, history)
        found = self.find_room(name)
        if found is not None:
            name = found
        elif not create:
            raise NoSuchRoom(name)
        user = self.user
        if user is not None:
            self.private = None
            self._write(
                lambda root: root.enter(user, self.lease_id, name, self.clock()),
                f"joining room {name!r}",
            )
        elif name not in self._root().rooms:
            self._write(lambda root: root.room(name), f"creating room {name!r}")
        self._manager.begin()
        room = self._root().rooms[name]
        self.private = None
        return self._watch(room, history)

    def _watch(self, room: ChatSession, history: int) -> list[Message]:
        self.room = room
        self.feed.watch([room.watch_target()])
        page = room.latest(history)
        room.skip_to_end()
        return page

    def shown_room(self) -> str:
        """The current room as shown to this user: ``#lobby``, ``#plans (private)``,
        ``@bob``."""
        if self.private is not None:
            return self._private_shown
        return f"#{self._current().name}"

    def find_room(self, room_name: str) -> str | None:
        """The stored spelling of the room ``room_name`` names, or None if none does.

        An exact match wins; otherwise the one room whose name differs only in case.
        Raises `AmbiguousRoom` when several do and none matches exactly. The exact
        look-up is one BTree search; only a miss scans the room names.
        """
        name = check_room_name(room_name)

        def find() -> str | None:
            rooms = self._root().rooms
            if name in rooms:
                return name
            wanted = name.casefold()
            matches = [stored for stored in rooms.keys() if stored.casefold() == wanted]
            if len(matches) > 1:
                raise AmbiguousRoom(name, matches)
            return matches[0] if matches else None

        return self._read(find)

    def rooms(self) -> list[RoomInfo]:
        """Every room's name and message count, by name: the public rooms, then the
        private rooms and direct conversations this user is a member of, shown as
        ``#name (private)`` and ``@other``. A room stored against the rules
        (`chatzeo.records`) is listed as ``MALFORMED_ROOM`` with count 0."""

        def listing() -> list[RoomInfo]:
            found: list[RoomInfo] = []
            try:
                for name, room in self._root().rooms.items():
                    if (
                        not isinstance(room, ChatSession)
                        or name_problem("room", name, MAX_ROOM_NAME) is not None
                        or room.display_name() != name
                    ):
                        found.append((MALFORMED_ROOM, 0))
                    else:
                        found.append((name, len(room)))
            except (StateLoadError, UnsafeRecord, POSKeyError, TypeError, ValueError):
                # A bucket of the directory cannot be loaded: the rest is unknown.
                found.append((MALFORMED_ROOM, 0))
            found += sorted(
                (_shown(room, self.user), len(room.session)) for room in self._visible()
            )
            return found

        self._catch_up()
        return self._read(listing)

    def who(self, room_name: str | None = None) -> list[str]:
        """Users present in a room now (the current one by default). In a private
        room: its members, each followed by `` (online)`` while connected. Raises
        `NoSuchRoom` for a named room that does not exist (never creates it)."""
        if room_name is None and self.private is not None:
            private = self.private
            return self._read(lambda: self._members_online(private))
        if room_name is None:
            name = self._current().name
        else:
            self._catch_up()
            self._manager.begin()
            private_room = self._find_private(check_room_name(room_name))
            if private_room is not None:
                return self._read(lambda: self._members_online(private_room))
            found = self.find_room(room_name)
            if found is None:
                raise NoSuchRoom(check_room_name(room_name))
            name = found
        return self._read(lambda: self._root().who(name, self.clock()))

    def other_connections(self) -> int:
        """How many live connections this client's user holds besides this one (the
        same name used in another terminal, or by someone else: without TLS client
        certificates a name proves nothing)."""
        user = self.user
        if user is None:
            return 0

        def count() -> int:
            record = self._root().users.get(user)
            if record is None:
                return 0
            now = self.clock()
            return sum(
                1 for lease, (_, expiry) in record.leases.items()
                if expiry > now and lease != self.lease_id
            )

        return self._read(count)

    # -- private rooms and direct conversations ------------------------------

    def create_private(self, room_name: str, history: int = 50) -> list[Message]:
        """Create the invite-only room ``room_name``, owned by this user, and enter
        it. Raises `PrivateRoomsNeedTLS` without client certificates, `ChatError` if
        a room of that name (public, or private and visible) exists."""
        name = check_room_name(room_name)
        owner = self._certified_user()
        self._manager.begin()
        if name in self._root().rooms or self._find_private(name) is not None:
            raise ChatError(f"a room named {name!r} exists already")
        key = new_key()
        self._write(lambda root: self._add_private(root, key, name, "room", owner, ()),
                    f"creating private room {name!r}")
        self._manager.begin()
        return self._enter_private(self._root().private[key], history)

    def query(self, other: str, history: int = 50, create: bool = True) -> list[Message]:
        """Enter the direct conversation with ``other`` (created on first use)."""
        room = self.direct(other, create=create)
        self._manager.begin()
        return self._enter_private(self._root().private[room], history)

    def direct(self, other: str, create: bool = True) -> str:
        """The key of this user's direct conversation with ``other``, created if
        missing (unless ``create`` is false: then `NotAMember`)."""
        other = check_user_name(other)
        me = self._certified_user()
        if other == me:
            raise ChatError("a direct conversation needs someone else")
        pair = tuple(sorted({me, other}))
        self._catch_up()
        self._manager.begin()
        for room in self._visible():
            if room.kind == "dm" and room.members == pair:
                return str(room.key)
        if not create:
            raise NotAMember(f"no conversation with {other}")
        key = new_key()
        self._write(lambda root: self._add_private(root, key, "dm", "dm", me, (other,)),
                    f"starting a conversation with {other!r}")
        return key

    def send_direct(self, other: str, text: str, kind: MessageKind = "say") -> Message:
        """Post ``text`` to the direct conversation with ``other`` without leaving
        the current room."""
        key = self.direct(other)
        self._manager.begin()
        session = self._root().private[key].session
        return session.add_message(text, self.user, kind=kind, policy=self.policy,
                                   clock=self.clock)

    def invite(self, name: str) -> bool:
        """Let ``name`` into the current private room (its owner only); False if
        already a member."""
        return self._change_members(name, add=True)

    def kick(self, name: str) -> bool:
        """Remove ``name`` from the current private room (its owner only); its
        connections lose access as soon as this commits. False if not a member."""
        return self._change_members(name, add=False)

    def members(self) -> tuple[str, tuple[str, ...]]:
        """The current private room's owner and members."""
        private = self._current_private()
        return self._read(lambda: (private.owner, tuple(private.members)))

    def _change_members(self, name: str, add: bool) -> bool:
        name = check_user_name(name)
        private = self._current_private()
        me = self._certified_user()
        oid = private._p_oid

        def change(root: ChatRoot) -> bool:
            room = root._p_jar.get(oid)
            return room.add_member(me, name) if add else room.remove_member(me, name)

        what = f"{'inviting' if add else 'removing'} {name!r}"
        return bool(self._write(change, what))

    def _catch_up(self, bound: float = 2.0) -> None:
        """Wait (at most ``bound`` seconds) until this client has heard of every
        commit the ZEO server had finished when asked. A new transaction sees only
        the invalidations already received, so without this a room someone was just
        invited to would not be found yet, and joining it would make a public room
        of that name instead. One round trip; nothing for other storages."""
        storage = self.db.storage
        call = getattr(storage, "_call", None)
        if call is None or not self.is_connected():
            return
        try:
            target = call("lastTransaction")
        except Exception:  # a lost server: the caller's own read will say so
            return
        deadline = time.monotonic() + bound
        while (storage.lastTransaction() or b"") < target and time.monotonic() < deadline:
            time.sleep(0.002)

    def _current_private(self) -> PrivateRoom:
        if self.private is None:
            raise ChatError("this is not a private room: /create NAME makes one")
        return self.private

    def _certified_user(self) -> str:
        if self.user is None:
            raise ChatError("private rooms need a user name")
        if not self.certified:
            raise PrivateRoomsNeedTLS()
        return self.user

    def _add_private(self, root: ChatRoot, key: str, name: str, kind: str, owner: str,
                     members: tuple[str, ...]) -> None:
        if root.private is None:
            raise PrivateRoomsNeedTLS(
                "this server keeps no private rooms: it runs without TLS client "
                "certificates (chatzeo serve --tls auto), so anyone could read them"
            )
        if key not in root.private:
            root.private[key] = PrivateRoom(key, name, kind, owner, members)

    def _visible(self) -> list[PrivateRoom]:
        """The private rooms this connection may read, in the current transaction.
        The server refuses the others as if they did not exist (POSKeyError)."""
        directory = self._root().private
        if directory is None:
            return []
        visible = []
        storage = self._connection._storage  # loads as of this transaction's start
        for room in directory.values():
            try:
                # Asked of the storage first: a refused ghost load would log a traceback.
                storage.load(room._p_oid)
            except POSKeyError:
                continue
            if self.user in room.members:
                visible.append(room)
        return visible

    def _find_private(self, name: str) -> PrivateRoom | None:
        if not self.certified:
            return None
        for room in self._visible():
            if room.kind == "room" and room.name.lower() == name.lower():
                return room
        return None

    def _enter_private(self, private: PrivateRoom, history: int) -> list[Message]:
        user = self.user
        if user is not None:
            self._write(lambda root: root.enter_private(user, self.lease_id, self.clock()),
                        "entering a private room")
            self._manager.begin()
        self.private = private
        self._private_shown = _shown(private, user)
        try:
            return self._watch(private.session, history)
        except POSKeyError:
            self.private = None
            raise NotAMember(f"you are not a member of {self._private_shown}") from None

    def _members_online(self, private: PrivateRoom) -> list[str]:
        now, users = self.clock(), self._root().users
        return [
            f"{name} (online)" if name in users and users[name].connections(now) else name
            for name in private.members
        ]

    # -- messages --------------------------------------------------------------

    def send(self, text: str, kind: MessageKind = "say") -> Message:
        """Post ``text`` to the current room as this user and commit it."""
        return self._current().add_message(
            text, self.user, kind=kind, policy=self.policy, clock=self.clock
        )

    def receive(self) -> list[Message]:
        """Messages committed to the current room since the last call, oldest first.
        Raises `NotAMember` once this user was removed from the current private room."""
        try:
            return self._read(lambda: self._current().new_messages())
        except POSKeyError:
            if self.private is None:
                raise
            raise NotAMember(f"you are no longer a member of {self._private_shown}") from None

    def history(self, limit: int, before: Message | None = None) -> list[Message]:
        """The ``limit`` messages before ``before`` (default: the latest), oldest first."""
        return self._read(lambda: self._current().history(before=before, limit=limit))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current room changes (True) or ``timeout`` passes (False)."""
        return self.feed.wait(timeout)

    def wake(self) -> None:
        """End a `wait` early, from any thread."""
        self.feed._fire()

    # -- presence --------------------------------------------------------------

    def heartbeat(self) -> None:
        """Renew this client's presence lease; re-acquire it if it lapsed."""
        if self.user is None:
            return
        user = self.user

        def renew(root: ChatRoot) -> None:
            now = self.clock()
            if not root.renew(user, self.lease_id, now):
                root.connect(user, self.lease_id, now)
                if self.private is not None:
                    root.enter_private(user, self.lease_id, now)
                elif self.room is not None:
                    root.enter(user, self.lease_id, self.room.name, now)

        self._write(renew, "renewing presence")

    def is_connected(self) -> bool:
        """Whether the storage is connected to its server (always True for local ones)."""
        check = getattr(self.db.storage, "is_connected", None)
        return True if check is None else bool(check())

    def close(self) -> None:
        """Count this connection out and release everything. Best effort when the
        server is gone: the lease then simply expires."""
        user = self.user
        try:
            if self._connected and user is not None and self.is_connected():
                # Without a server, waiting to count out only delays leaving.
                self._connected = False
                self._write(
                    lambda root: root.disconnect(user, self.lease_id),
                    "disconnecting",
                    policy=RetryPolicy(max_seconds=2.0),
                )
        except Exception as error:  # the lease expires by itself
            log.info("could not count connection out: %s", error)
        finally:
            self.feed.close()
            self._manager.abort()
            self._connection.close()

    # -- helpers ---------------------------------------------------------------

    def _root(self) -> ChatRoot:
        return get_root(self._connection)

    def _current(self) -> ChatSession:
        if self.room is None:
            raise RuntimeError("join a room first")
        return self.room

    def _read(self, read: Callable[[], T]) -> T:
        """``read()`` in a fresh transaction. A pack on the server can delete a revision
        this client's snapshot still needs (its invalidation for the newer revision not
        yet in): ZODB then raises `ReadConflictError`, and a later snapshot has the
        newer revision. Retried within the client's policy; a failed read changes
        nothing (cursors move only on success)."""
        started = time.monotonic()
        attempt = 0
        while True:
            self._manager.begin()
            try:
                return read()
            except ReadConflictError:
                self._manager.abort()
                if time.monotonic() - started >= self.policy.max_seconds:
                    raise
                time.sleep(self.policy.delay(attempt))
                attempt += 1

    def _write(
        self, change: Callable[[ChatRoot], Any], what: str, policy: RetryPolicy | None = None
    ) -> Any:
        return run_in_transaction(
            self.db,
            lambda connection: change(get_root(connection)),
            what=what,
            policy=policy or self.policy,
        )


def _shown(room: PrivateRoom, viewer: str | None) -> str:
    shown = room.shown_name(viewer)
    return f"{shown} (private)" if room.kind == "room" else shown
