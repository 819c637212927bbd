"""`ChatClient`: one participant's view of the chat, as the command line and the terminal use it.

It owns one ZODB connection with its own transaction manager, a `ChangeFeed` on
the rooms it has open, and (for a named user) a presence lease renewed by
`heartbeat`. Several rooms may be open at once (`join` adds one, `part` closes one,
`switch` picks the current one); `remember=True` also records the room in the
user's joined rooms, so the next start reopens it (`joined_rooms`).

Read markers: `mark_read` notes in memory where the user stopped reading; the note
is written (one commit for every room) by `flush_marks` at most every `MARK_EVERY`
seconds, or at once with ``force=True`` (on switching, parting, leaving), so reading
does not cost a commit per message. Several connections of one user merge their
markers on the server (`chatzeo.markers`).
Every write (joining, posting, renewing) runs in its own retried transaction
(`chatzeo.retry`); reads happen in the client's connection, refreshed by `receive`.

Threads: a `ChatClient` belongs to the thread that created it, except `wake`, which
any thread may call to end a `wait` early.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import transaction
from ZODB.POSException import POSKeyError, ReadConflictError, StateLoadError

from .delivery import ChangeFeed
from .errors import (
    AmbiguousRoom,
    ChatError,
    NoSuchRoom,
    NoSuchUser,
    NotAMember,
    PrivateRoomsNeedTLS,
    UnsafeRecord,
)
from .message import Message, MessageKind, new_message_id
from .privacy import PrivateRoom, new_key
from .realm import ChatRoot, _presence, get_root
from .records import MAX_ROOM_NAME, name_problem
from .retry import DEFAULT_POLICY, RetryPolicy, run_in_transaction, with_retries
from .session import ChatSession
from .unread import RoomUnread, latest_mentions, unread_rooms
from .validation import check_room_name, check_topic, check_user_name

__all__ = ["ChatClient", "RoomInfo", "CatchUp", "MARK_EVERY", "MALFORMED_ROOM"]

# What `ChatClient.rooms` lists for a room entry that breaks the rules.
MALFORMED_ROOM = "[malformed room]"

# The shortest time between two marker writes while reading (seconds).
MARK_EVERY = 5.0


@dataclass(frozen=True)
class CatchUp:
    """What a user missed in a room since their marker.

    ``unread`` messages are new since they left, of which ``messages`` are the newest
    (all of them unless more than asked for); ``lost`` more were removed by retention
    before they were read."""

    room: str
    unread: int
    lost: int
    messages: tuple[Message, ...]

RoomInfo = tuple[str, int]
T = TypeVar("T")

log = logging.getLogger(__name__)


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
        # Rooms open in this client, by key, in the order opened: a public room's
        # key is its name; a private room's its shown label (``#plans (private)``,
        # ``@bob``), which no public name can equal. Its record is in ``_private``.
        self.open_rooms: dict[str, ChatSession] = {}
        self._private: dict[str, PrivateRoom] = {}
        self._removed: list[tuple[str, bool]] = []  # private rooms closed on removal, not yet told
        self._marks: dict[str, int] = {}  # room name -> key read, not yet written
        self._marked_at = -MARK_EVERY
        # Whether this connection proves a name with a TLS client certificate: only
        # then does the server keep private rooms private (chatzeo.server.readguard).
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

    def join(
        self,
        room_name: str,
        history: int | None = 50,
        create: bool = True,
        *,
        remember: bool = False,
        after: int | None = None,
    ) -> list[Message]:
        """Open ``room_name`` and make it the current room; rooms already open stay.

        Room names match without regard to case (``Dev`` finds ``dev``; `find_room`
        says how). Returns its latest ``history`` messages, or with ``after`` (a key)
        the messages after it (the oldest ``history`` of them; all if None); `receive`
        then returns only what comes after the newest message. A missing room is
        created, or with ``create=False`` refused with `NoSuchRoom`. With
        ``remember`` (a named user), the room joins the user's joined rooms, and a
        first join sets its read marker to the newest message: what came before is
        history, not unread.
        """
        if room_name.startswith("@"):
            return self.query(room_name[1:], history=history or 0, create=create)
        name = check_room_name(room_name)
        self._catch_up()
        self._manager.begin()
        private = self._find_private(name)
        if private is not None:
            return self._enter_private(private, history or 0)
        found = self.find_room(name)
        if found is not None:
            name = found
        elif not create:
            raise NoSuchRoom(name)
        user = self.user
        if user is not None:

            def enter(root: ChatRoot) -> None:
                room = root.enter(user, self.lease_id, name, self.clock(), stay=True)
                if remember:
                    member = root.users[user]
                    member.join(name)
                    if room not in member.own_markers():
                        member.own_markers().mark(room, room.last_key)

            self._write(enter, f"joining room {name!r}")
        elif name not in self._root().rooms:
            self._write(lambda root: root.room(name), f"creating room {name!r}")
        self._manager.begin()
        return self._open(name, self._root().rooms[name], history, after)

    def _open(
        self, key: str, room: ChatSession, history: int | None, after: int | None = None
    ) -> list[Message]:
        self.room = room
        self.open_rooms[key] = room
        self._watch()
        if after is not None:
            page = room.messages_after(after, limit=history)
            if history is None or len(page) < history:
                room.skip_to_end()
            elif page:  # paging: `receive` goes on from the last message returned
                room._cursor().key = page[-1].key
        else:
            page = room.latest(history or 0)
            room.skip_to_end()
        return self._named(key, page)

    def _named(self, key: str | None, messages: list[Message]) -> list[Message]:
        # A private room's messages name its session (``p-<key>``); shown and
        # counted under its key in `open_rooms` instead.
        if key is None or key not in self._private:
            return messages
        return [replace(message, room=key) for message in messages]

    @property
    def current(self) -> str | None:
        """The current room's key in `open_rooms` (a public room's name, a private
        one's `shown_room` label), or None before any join."""
        for key, room in self.open_rooms.items():
            if room is self.room:
                return key
        return None

    @property
    def private(self) -> PrivateRoom | None:
        """The current room's `PrivateRoom` if it is one, else None."""
        key = self.current
        return self._private.get(key) if key is not None else None

    def is_private(self, key: str) -> bool:
        """Whether the open room ``key`` is a private room or direct conversation."""
        return key in self._private

    def shown_room(self) -> str:
        """The current room as shown to this user: ``#lobby``, ``#plans (private)``,
        ``@bob``."""
        key = self.current
        if key is None:
            raise RuntimeError("join a room first")
        return key if key in self._private else f"#{key}"

    def switch(self, room_name: str) -> ChatSession:
        """Make the open room ``room_name`` (a key of `open_rooms`, or a public
        room's name) the current one; `NoSuchRoom` if not open."""
        name = room_name if room_name in self._private else check_room_name(room_name)
        room = self.open_rooms.get(name)
        if room is None:
            raise NoSuchRoom(name)
        self.room = room
        return room

    def part(self, room_name: str, *, remember: bool = True) -> None:
        """Close the open room ``room_name`` (as `switch` names it): its marker is
        written, this connection is no longer present there and (with ``remember``)
        the user's joined rooms forget it. The current room becomes the last one
        opened, or None. A private room was never entered in any record, so parting
        it writes nothing."""
        name = room_name if room_name in self._private else check_room_name(room_name)
        if name not in self.open_rooms:
            raise NoSuchRoom(name)
        self.flush_marks(force=True)
        user = self.user
        if user is not None and name not in self._private:

            def leave(root: ChatRoot) -> None:
                root.leave(user, self.lease_id, name)
                if remember and user in root.users:
                    root.users[user].part(name)

            self._write(leave, f"leaving room {name!r}")
        self._close_room(name)

    def _close_room(self, key: str) -> None:
        was_current = self.current == key
        del self.open_rooms[key]
        self._private.pop(key, None)
        if was_current:
            self.room = next(reversed(self.open_rooms.values()), None)
        self._watch()

    def joined_rooms(self) -> list[str]:
        """The rooms this user joined (and did not part), in the order joined."""
        user = self.user
        if user is None:
            return []

        def joined() -> list[str]:
            member = self._root().users.get(user)
            return list(member.joined) if member is not None else []

        return self._read(joined)

    def _watch(self) -> None:
        # A room's clock changes with every post, the room itself with its topic,
        # its presence tree when someone comes or goes (or renews a lease).
        watched: list[Any] = []
        for room in self.open_rooms.values():
            watched += [room.watch_target(), room]
            presence = _presence(room)  # None where a malformed record holds none
            if presence is not None:
                watched.append(presence)
        self.feed.watch(watched)

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
            matches = [stored for stored in rooms if stored.casefold() == wanted]
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
        session: ChatSession = self._root().private[key].session
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
            room: PrivateRoom = root._p_jar.get(oid)
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
        if not self.certified or call is None or not self.is_connected():
            return  # without certificates there are no private rooms to look for
        sync = getattr(storage, "fanout_sync", None)
        try:
            # Watched fan-out sends this client only commits touching what it holds
            # (chatzeo.server.fanout): a room never loaded here is never invalidated, so
            # waiting for invalidations would not end. Its sync reply comes after
            # every invalidation up to the server's last tid.
            if sync is not None and sync() is not None:
                return
        except Exception:  # a lost server: the caller's own read will say so
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
        # Nothing is written: presence lives in leases and public rooms, readable by
        # everybody, so it must not say who is in a private room. Who is there is
        # its members that are online (`who`); the connection stays present in the
        # public rooms it has open.
        key = _shown(private, self.user)
        previous = self.room
        self._private[key] = private
        try:
            return self._open(key, private.session, history)
        except POSKeyError:
            self._close_room(key)
            if previous is not None and any(r is previous for r in self.open_rooms.values()):
                self.room = previous
            raise NotAMember(f"you are not a member of {key}") from None

    def _members_online(self, private: PrivateRoom) -> list[str]:
        now, users = self.clock(), self._root().users
        return [
            f"{name} (online)" if name in users and users[name].connections(now) else name
            for name in private.members
        ]

    # -- messages --------------------------------------------------------------

    def send(self, text: str, kind: MessageKind = "say", *, read_back: bool = True) -> Message:
        """Post ``text`` to the current room as this user and commit it; see
        `ChatSession.add_message` (``text`` checked unless a `CheckedText`; without
        ``read_back`` the key is the one proposed, and `receive` brings the message
        under its final key)."""
        return self._current().add_message(
            text, self.user, kind=kind, policy=self.policy, clock=self.clock,
            read_back=read_back,
        )

    def receive(self) -> list[Message]:
        """Messages committed to the current room since the last call, oldest first.
        Raises `NotAMember` once this user was removed from the current private room."""
        try:
            return self._named(self.current, self._read(lambda: self._current().new_messages()))
        except POSKeyError:
            key = self.current
            if key is None or key not in self._private:
                raise
            self._close_room(key)
            raise NotAMember(f"you are no longer a member of {key}", key) from None

    def receive_all(self) -> dict[str, list[Message]]:
        """New messages of every open room since the last call, by room; rooms with
        nothing new are left out. One transaction for all. A private room this user
        was removed from is closed and listed by `take_removed`."""

        def read() -> dict[str, list[Message]]:
            found = {}
            for name, room in self.open_rooms.items():
                try:
                    messages = room.new_messages()
                except POSKeyError:
                    if name not in self._private:
                        raise
                    lost.append(name)  # the server refuses it now: removed
                    continue
                if messages:
                    found[name] = self._named(name, messages)
            return found

        lost: list[str] = []
        try:
            return self._read(read)
        finally:
            for name in dict.fromkeys(lost):
                if name in self.open_rooms:
                    was_current = self.current == name
                    self._close_room(name)
                    self._removed.append((name, was_current))

    def take_removed(self) -> list[tuple[str, bool]]:
        """The private rooms `receive_all` closed because this user was removed
        from them since the last call, each with whether it was the current one."""
        removed, self._removed = self._removed, []
        return removed

    def catch_up(self, room_name: str, limit: int = 200) -> CatchUp:
        """What this user missed in the open room ``room_name`` since their marker,
        with the newest ``limit`` of those messages; `receive` then returns only
        later ones."""
        user = self.user
        room = self.open_rooms.get(room_name)
        if room is None:
            raise NoSuchRoom(room_name)

        def read() -> CatchUp:
            member = self._root().users.get(user) if user is not None else None
            markers = member.markers if member is not None else None
            if markers is None or room not in markers:
                room.skip_to_end()
                return CatchUp(room_name, 0, 0, ())
            marker = max(markers.get(room), self._marks.get(room_name, 0))
            unread = markers.unread_count(room) if marker == markers.get(room) else len(
                room.messages_after(marker)
            )
            lost = markers.lost(room) if marker == markers.get(room) else 0
            if unread <= limit:
                messages = room.messages_after(marker, limit=limit)
            else:
                messages = room._newest(limit, marker + 1, None)
            room.skip_to_end()
            return CatchUp(room_name, unread, lost, tuple(messages))

        return self._read(read)

    def unread(self, user_name: str | None = None) -> list[RoomUnread]:
        """Unread counts, losses and mentions in every room ``user_name`` (default:
        this client's user) joined, as stored: marks not yet written do not count.
        Raises `NoSuchUser` for a user that never connected."""
        user = check_user_name(user_name) if user_name is not None else self.user
        if user is None:
            return []

        def read() -> list[RoomUnread]:
            if user not in self._root().users:
                raise NoSuchUser(user)
            return unread_rooms(self._root(), user)

        return self._read(read)

    def background_unread(self) -> list[RoomUnread]:
        """`unread` for the open rooms but the current one, and their cursors moved
        to the same view: `receive_all` then returns only what comes after these
        counts, so nothing is counted twice."""
        user = self.user
        current = self.current

        def read() -> list[RoomUnread]:
            if user is None:
                return []
            rows = [row for row in unread_rooms(self._root(), user)
                    if row.room in self.open_rooms and row.room != current]
            for name, room in self.open_rooms.items():
                if name != current:
                    room.skip_to_end()
            return rows

        return self._read(read)

    def mentions(self, limit: int = 20) -> list[Message]:
        """The newest ``limit`` messages mentioning this user in the rooms they joined
        or have open, oldest first."""
        user = self.user
        if user is None:
            return []

        def read() -> list[Message]:
            root = self._root()
            member = root.users.get(user)
            names = dict.fromkeys([*(member.joined if member else ()), *self.open_rooms])
            rooms = [root.rooms[name] for name in names if name in root.rooms]
            return latest_mentions(rooms, user, limit=limit)

        return self._read(read)

    # -- read markers ----------------------------------------------------------

    def mark_read(self, room_name: str, key: int) -> None:
        """Note that the user read ``room_name`` up to ``key``; written by `flush_marks`.
        Private rooms keep no markers (a user's markers are readable by everybody)."""
        if room_name in self._private:
            return
        if key > self._marks.get(room_name, 0):
            self._marks[room_name] = key

    def marks_due_in(self) -> float | None:
        """Seconds until `flush_marks` would write the noted markers (0: now), or None
        if nothing is noted."""
        if not self._marks:
            return None
        return max(0.0, MARK_EVERY - (time.monotonic() - self._marked_at))

    def flush_marks(self, *, force: bool = False) -> bool:
        """Write the noted markers in one commit, if there are any and `MARK_EVERY`
        seconds have passed since the last write (or ``force``). True if written.
        A marker never moves back, and one that did not move writes nothing."""
        user = self.user
        if user is None or not self._marks:
            return False
        now = time.monotonic()
        if not force and now - self._marked_at < MARK_EVERY:
            return False
        marks = dict(self._marks)

        def write(root: ChatRoot) -> None:
            markers = root.user(user).own_markers()
            for name, key in marks.items():
                if name in root.rooms:
                    markers.mark(root.rooms[name], key)

        self._write(write, "writing read markers")
        for name, key in marks.items():
            if self._marks.get(name) == key:
                del self._marks[name]
        self._marked_at = now
        return True

    # -- topics and presence ---------------------------------------------------

    def set_topic(self, text: str) -> None:
        """Set (``""``: clear) the current room's topic as this user."""
        user = self.user
        if user is None:
            raise NoSuchRoom("an anonymous reader cannot set a topic")
        text = check_topic(text)
        if self.private is not None:
            raise ChatError("a private room has no topic")
        name = self._current().name
        self._write(
            lambda root: root.rooms[name].set_topic(text, user, clock=self.clock),
            f"setting the topic of {name!r}",
        )

    def topic(self, room_name: str | None = None) -> tuple[str, str, float] | None:
        """An open room's topic as ``(text, set by, when)`` (text "" if cleared), or None."""
        room = self.open_rooms.get(room_name) if room_name else self._current()
        if room is None:
            raise NoSuchRoom(str(room_name))
        return self._read(lambda: room.topic)

    def presence(self) -> dict[str, frozenset[str]]:
        """Who is present in each open room now, by room."""
        now = self.clock()

        def read() -> dict[str, frozenset[str]]:
            found = {}
            for name in self.open_rooms:
                private = self._private.get(name)
                if private is None:
                    found[name] = frozenset(self._root().who(name, now))
                else:  # its members that are online: nobody "enters" a private room
                    found[name] = frozenset(
                        member.removesuffix(" (online)")
                        for member in self._members_online(private)
                        if member.endswith(" (online)")
                    )
            return found

        return self._read(read)

    def online(self, user_name: str) -> bool:
        """Whether ``user_name`` holds any live connection now."""
        now = self.clock()

        def read() -> bool:
            member = self._root().users.get(user_name)
            return member is not None and member.connections(now) > 0

        return self._read(read)

    def history(self, limit: int, before: Message | None = None) -> list[Message]:
        """The ``limit`` messages before ``before`` (default: the latest), oldest first."""
        return self._named(
            self.current, self._read(lambda: self._current().history(before=before, limit=limit))
        )

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

        # Re-entered after a lapse: the public rooms, the current one last (the lease
        # names it); private ones were never entered (`_enter_private`).
        current = self.current
        public = [name for name in self.open_rooms if name not in self._private]
        public.sort(key=lambda name: name == current)

        def renew(root: ChatRoot) -> None:
            now = self.clock()
            if not root.renew(user, self.lease_id, now):
                root.connect(user, self.lease_id, now)
                for name in public:
                    root.enter(user, self.lease_id, name, now, stay=True)

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
                try:
                    self.flush_marks(force=True)
                finally:
                    rooms = [name for name in self.open_rooms if name not in self._private]
                    self._write(
                        lambda root: root.disconnect(user, self.lease_id, also=rooms),
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

        def attempt() -> T:
            self._manager.begin()
            try:
                return read()
            except ReadConflictError:
                self._manager.abort()
                raise

        return with_retries(
            attempt,
            retryable=lambda error: isinstance(error, ReadConflictError),
            what="read",
            policy=self.policy,
        )

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
