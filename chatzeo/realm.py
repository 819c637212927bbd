"""The realm: rooms by name, one persistent object per user, connections and presence.

After Twisted's ``CachingRealm`` (``../shared/seeds/000_*``): a user name maps to one
persistent `User` however many connections use it; each connection is counted while
it lives, and a configurable maximum refuses the next one. Unlike the seed's counter,
a connection is a *lease* with an expiry that its client renews by heartbeat, so a
client that crashes without disconnecting drops out of `who` and out of the count
once its lease runs out, instead of staying "online" for ever.

Each user also keeps, on their own objects, the rooms they joined (`User.joined`,
rejoined at the next start) and where they stopped reading (`User.markers`, a
`chatzeo.markers.ReadMarkers`): never on the room, so reading never writes what
posting writes. Users stored before these existed load with none of either.

Presence costs little (docs/scaling.md): a lease lives in its user's own ``leases``
tree, which only that user's connections load, and a renewal writes only there, and
only once less than half of the lease is left (`RENEW_FRACTION`); a room's
``presence`` tree is written when a connection enters or leaves it, never by a
renewal, so heartbeats wake nobody else. `who` takes liveness from the leases.
With leases of `ChatRoot.lease_seconds` (300 s for new databases), 1,000 users
renew about 7 times a second in all.

Everything here changes objects in the caller's transaction; `chatzeo.client` runs
each operation in its own retried transaction. Creating a room or user twice at once
is safe: both insert the same key into one BTree bucket, which conflicts, and the
loser's retry finds the winner's object.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.POSException import POSKeyError, StateLoadError

from .errors import MalformedRecord, TooManyConnections, UnsafeRecord
from .markers import ReadMarkers
from .records import lease_problem, presence_problem
from .session import ChatSession
from .validation import check_room_name, check_user_name

__all__ = ["ChatRoot", "User", "get_root", "ROOT_KEY", "MALFORMED_PRESENCE"]

ROOT_KEY = "chatzeo"
# A renewal writes once less than this share of the lease is left.
RENEW_FRACTION = 0.5
# What `ChatRoot.who` lists for a presence entry that breaks the rules: not a valid
# user name, so it cannot be mistaken for one.
MALFORMED_PRESENCE = "[malformed presence entry]"


class User(Persistent):
    """One chat user: the name, the leases of the connections it holds now, the rooms
    it joined and its read markers."""

    # Users stored before these existed load with the defaults: no rooms remembered,
    # no markers (created by the first `join`).
    joined: tuple[str, ...] = ()
    markers: ReadMarkers | None = None

    def __init__(self, name: str) -> None:
        self.name = check_user_name(name)
        # lease id -> (room name or None, expiry in epoch seconds)
        self.leases = OOBTree()
        self.last_connected = 0.0

    def join(self, room_name: str) -> bool:
        """Remember ``room_name`` among the joined rooms (last); True if it was not.
        Creates the user's markers on first use, so a join is what writes them."""
        name = check_room_name(room_name)
        self.own_markers()
        if name in self.joined:
            return False
        self.joined = (*self.joined, name)
        return True

    def own_markers(self) -> ReadMarkers:
        """The user's read markers, created (in the caller's transaction) if missing."""
        if self.markers is None:
            self.markers = ReadMarkers()
        return self.markers

    def part(self, room_name: str) -> bool:
        """Forget ``room_name`` (its marker stays, for a later rejoin); True if joined."""
        if room_name not in self.joined:
            return False
        self.joined = tuple(name for name in self.joined if name != room_name)
        return True

    def __repr__(self) -> str:
        return f"<User {self.name!r}>"

    def connections(self, now: float) -> int:
        """How many of this user's connections hold a lease that has not expired."""
        return sum(
            1
            for lease_id, entry in self.leases.items()
            if lease_problem(lease_id, entry) is None and entry[1] > now
        )


class ChatRoot(Persistent):
    """The top of chatzeo's object graph: rooms, users and the connection rules.

    ``private`` is the directory of private rooms (`chatzeo.privacy`): None (also
    for roots stored before it existed) unless the server runs with client
    certificates, which creates it.
    """

    private: Any = None

    def __init__(self, *, max_connections: int = 8, lease_seconds: float = 300.0) -> None:
        self.rooms = OOBTree()
        self.users = OOBTree()
        self.max_connections = max_connections
        self.lease_seconds = lease_seconds

    # -- rooms and users -------------------------------------------------------

    def room(self, name: str) -> ChatSession:
        """The room called ``name``, created on first use."""
        name = check_room_name(name)
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = ChatSession(name)
        elif not isinstance(room, ChatSession):
            raise MalformedRecord(f"room {name!r}", f"is a {type(room).__name__}")
        return room

    def user(self, name: str) -> User:
        """The user called ``name``, created on first use (the seed's CachingRealm)."""
        name = check_user_name(name)
        user = self.users.get(name)
        if user is None:
            user = self.users[name] = User(name)
        elif not _is_user(user):
            raise MalformedRecord(f"user {name!r}", "is not a User with a leases tree")
        found: User = user
        return found

    # -- connections and presence ---------------------------------------------

    def connect(self, user_name: str, lease_id: str, now: float) -> User:
        """Count a new connection of ``user_name`` in, under ``lease_id``.

        Expired leases are dropped first. Raises `TooManyConnections` when the user
        already holds `max_connections` live ones. Writing the user object makes two
        simultaneous connects of one user conflict, so the limit holds under races.
        """
        user = self.user(user_name)
        for stale, entry in list(user.leases.items()):
            if lease_problem(stale, entry) is not None:
                del user.leases[stale]  # malformed (a plain ZEO server stores anything)
            elif entry[1] <= now:
                del user.leases[stale]
                self._leave(entry[0], stale)
        if lease_id not in user.leases and len(user.leases) >= self.max_connections:
            raise TooManyConnections(user.name, self.max_connections)
        user.leases[lease_id] = (None, now + self.lease_seconds)
        user.last_connected = now
        return user

    def disconnect(self, user_name: str, lease_id: str, also: Iterable[str] = ()) -> None:
        """Count a connection out: drop its lease and its presence in its room (and
        in the rooms named in ``also``, where a client of several rooms is present)."""
        user = self.users.get(user_name)
        if user is None:
            return
        entry = user.leases.pop(lease_id, None)
        rooms = set(also)
        if entry is not None and entry[0] is not None:
            rooms.add(entry[0])
        for room_name in rooms:
            self._leave(room_name, lease_id)

    def leave(self, user_name: str, lease_id: str, room_name: str) -> None:
        """End a connection's presence in one room (it stays in its others)."""
        self._leave(room_name, lease_id)

    def enter(
        self, user_name: str, lease_id: str, room_name: str, now: float, *, stay: bool = False
    ) -> ChatSession:
        """Move a connection into ``room_name`` (leaving its previous room, unless
        ``stay``: a client of several rooms is present in each of them)."""
        user = self.user(user_name)
        previous = user.leases.get(lease_id, (None, 0.0))[0]
        room = self.room(room_name)
        if not stay and previous not in (None, room.name):
            self._leave(previous, lease_id)
        expiry = now + self.lease_seconds
        user.leases[lease_id] = (room.name, expiry)
        presence = _presence(room)
        if presence is not None:
            presence[lease_id] = (user.name, expiry)
        return room

    def renew(self, user_name: str, lease_id: str, now: float) -> bool:
        """Extend a live lease; False if it expired or was never granted.

        Writes only the user's own leases, and only when less than `RENEW_FRACTION`
        of the lease is left: most heartbeats commit nothing at all."""
        user = self.users.get(user_name)
        entry = user.leases.get(lease_id) if user is not None else None
        if entry is None or lease_problem(lease_id, entry) is not None or entry[1] <= now:
            return False
        room_name, expiry = entry
        if expiry - now < self.lease_seconds * RENEW_FRACTION:
            user.leases[lease_id] = (room_name, now + self.lease_seconds)
        return True

    def _alive(self, user_name: str, lease_id: str, room_name: str, now: float) -> bool:
        """Whether ``user_name`` holds ``lease_id`` unexpired (``room_name``'s
        presence names the lease). The lease names only the connection's current
        room: a client of several rooms is present in each (`enter` with ``stay``),
        and leaving one drops its presence there (`leave`)."""
        user = self.users.get(user_name)
        if not _is_user(user):
            return False
        entry = user.leases.get(lease_id)
        return entry is not None and lease_problem(lease_id, entry) is None and entry[1] > now

    def _leave(self, room_name: Any, lease_id: str) -> None:
        """Drop ``lease_id``'s presence in ``room_name``, if that room can hold it."""
        if type(room_name) is str:
            presence = _presence(self.rooms.get(room_name))
            if presence is not None:
                presence.pop(lease_id, None)

    def who(self, room_name: str, now: float) -> list[str]:
        """Names of the users with a live lease in the room, sorted; then one
        `MALFORMED_PRESENCE` placeholder per presence entry that breaks
        `chatzeo.records.presence_problem` (stored through a plain ZEO server).

        The room's presence says who entered; the users' leases say who is still
        alive (renewals do not touch the room)."""
        room = self.rooms.get(check_room_name(room_name))
        if not isinstance(room, ChatSession):
            return []
        names: set[str] = set()
        malformed = 0
        presence = room._field("presence")
        try:
            items = list(presence.items()) if isinstance(presence, OOBTree) else None
        except (StateLoadError, UnsafeRecord, POSKeyError, TypeError, ValueError):
            items = None
        if items is None:
            return [MALFORMED_PRESENCE]
        for lease_id, entry in items:
            if presence_problem(lease_id, entry) is not None:
                malformed += 1
            elif self._alive(entry[0], lease_id, room.name, now):
                names.add(entry[0])
        return sorted(names) + [MALFORMED_PRESENCE] * malformed


def _is_user(user: Any) -> bool:
    """A `User` with a leases tree (a plain ZEO server may have stored anything)."""
    if not isinstance(user, User):
        return False
    user._p_activate()
    return isinstance(user.__dict__.get("leases"), OOBTree)


def _presence(room: Any) -> OOBTree | None:
    """A room's presence tree, or None where a malformed record holds none."""
    if not isinstance(room, ChatSession):
        return None
    presence = room._field("presence")
    return presence if isinstance(presence, OOBTree) else None


def get_root(connection: Any) -> ChatRoot:
    """chatzeo's `ChatRoot` in ``connection``'s database, created on first use."""
    root = connection.root()
    chat_root = root.get(ROOT_KEY)
    if chat_root is None:
        chat_root = root[ROOT_KEY] = ChatRoot()
    found: ChatRoot = chat_root
    return found
