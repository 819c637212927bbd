"""Private rooms and direct messages: who may read them, and the rule for changing that.

What is stored
    ``ChatRoot.private`` is an ``OOBTree`` from an opaque key (16 random hex digits,
    `new_key`) to a `PrivateRoom`: the room's display ``name``, its ``kind``
    (``"room"``, invite-only, or ``"dm"``, a direct conversation of two), its
    ``owner``, its ``members`` (a sorted tuple of user names, the owner among them)
    and its ``session``, an ordinary `ChatSession` named ``p-<key>``. The directory
    is readable by everybody but holds only keys and references; everything else
    (this record, the session, its clock, message buckets and presence) is served
    by `chatzeo serve` only to the certificates of the members (`chatzeo.server.readguard`).
    The key is random, not derived from the members' names, so that the directory
    does not tell who talks to whom.

    ``ChatRoot.private`` exists only in a database served with TLS client
    certificates: `chatzeo serve` creates it when it starts with them (and refuses
    to start without them once it exists). Without TLS every client can read every
    object, so there are no private rooms: `PrivateRoomsNeedTLS` says so.

The rule (`access_problem`, checked by the server at each commit)
    A new `PrivateRoom` is made by its owner, who is one of its members, with a
    new session; a direct conversation has exactly two members. Afterwards only the
    owner changes it, and only its members; the owner stays a member; the key,
    name, kind, owner and session never change; a conversation's members never
    change. Kept here, apart from `chatzeo.server.rules`, so that the record schema can
    take it over.

Pure functions and a persistent class; the functions run in the server's event
loop, the class in the thread of the connection that loads it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from typing import Any

from persistent import Persistent

from .errors import ChatError, NotOwner, PrivateRoomsNeedTLS
from .session import ChatSession
from .validation import check_room_name, check_user_name

__all__ = [
    "PrivateRoom",
    "PrivateRoomsNeedTLS",
    "NotOwner",
    "new_key",
    "access_problem",
    "MAX_MEMBERS",
    "KINDS",
]

MAX_MEMBERS = 256
KINDS = ("room", "dm")
_KEY = re.compile(r"[0-9a-f]{16}\Z")


def new_key() -> str:
    """A fresh, unguessable key for `ChatRoot.private`."""
    return secrets.token_hex(8)


def _members(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({check_user_name(name) for name in names}))


class PrivateRoom(Persistent):
    """Who may read one private room or direct conversation, and the room itself."""

    def __init__(self, key: str, name: str, kind: str, owner: str, members: Iterable[str]):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.key = key
        self.name = check_room_name(name)
        self.kind = kind
        self.owner = check_user_name(owner)
        self.members = _members([owner, *members])
        self.session = ChatSession(f"p-{key}")

    def __repr__(self) -> str:
        return f"<PrivateRoom {self.kind} {self.name!r} of {self.owner!r}>"

    def shown_name(self, viewer: str | None) -> str:
        """``#name`` for a room, ``@other`` for a conversation seen by ``viewer``."""
        if self.kind == "dm":
            others = [name for name in self.members if name != viewer]
            return "@" + (others[0] if others else viewer or "?")
        return f"#{self.name}"

    def add_member(self, by: str, name: str) -> bool:
        """Let ``name`` in; False if already a member. Raises `NotOwner`."""
        self._check_owner(by)
        name = check_user_name(name)
        if name in self.members:
            return False
        if len(self.members) >= MAX_MEMBERS:
            raise ChatError(f"a private room holds at most {MAX_MEMBERS} members")
        self.members = _members([*self.members, name])
        return True

    def remove_member(self, by: str, name: str) -> bool:
        """Remove ``name``; False if not a member. Raises `NotOwner`; the owner stays."""
        self._check_owner(by)
        if name == self.owner:
            raise ChatError("the owner cannot be removed from their own room")
        if name not in self.members:
            return False
        self.members = tuple(member for member in self.members if member != name)
        return True

    def _check_owner(self, by: str) -> None:
        if self.kind == "dm":
            raise ChatError("a direct conversation keeps its two members")
        if by != self.owner:
            raise NotOwner(f"only {self.owner} can change who is in #{self.name}")


def access_problem(
    identity: str | None, old: Any, new: Any, session_is_new: bool = True
) -> str | None:
    """What is wrong with a commit writing a `PrivateRoom` state, or None.

    ``old`` is the state the writer started from (None for a new record), ``new``
    the state written, both as `chatzeo.server.decoding.decode` gives them (dicts, references
    as objects with an ``oid``); ``session_is_new`` whether the session it names is
    a new object of the same commit.
    """
    if not isinstance(new, dict) or set(new) != {
        "key", "name", "kind", "owner", "members", "session"
    }:
        return "a private room record is malformed"
    key, kind, owner, members = new["key"], new["kind"], new["owner"], new["members"]
    if not (isinstance(key, str) and _KEY.match(key)) or kind not in KINDS:
        return "a private room record is malformed"
    if not hasattr(new["session"], "oid"):
        return "a private room record is malformed"
    try:
        check_room_name(new["name"])
        if not isinstance(members, tuple) or _members(members) != members:
            return "a private room's members must be a sorted tuple of user names"
        check_user_name(owner)
    except ChatError:
        return "a private room record holds a bad name"
    if owner not in members:
        return "a private room's owner must be one of its members"
    if len(members) > MAX_MEMBERS:
        return f"a private room holds at most {MAX_MEMBERS} members"
    if kind == "dm" and len(members) != 2:
        return "a direct conversation has exactly two members"
    if old is None:
        if identity != owner:
            return f"{identity!r} cannot create a private room owned by {owner!r}"
        if not session_is_new:
            return "a new private room must bring a new session"
        return None
    if not isinstance(old, dict):
        return "a private room record is malformed"
    if identity != old.get("owner"):
        return f"only the owner, {old.get('owner')!r}, changes who is in a private room"
    for fixed in ("key", "name", "kind", "owner"):
        if new[fixed] != old.get(fixed):
            return f"a private room's {fixed} cannot change"
    if getattr(old.get("session"), "oid", None) != new["session"].oid:
        return "a private room's session cannot change"
    if kind == "dm" and members != old.get("members"):
        return "a direct conversation keeps its two members"
    return None
