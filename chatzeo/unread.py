"""What a user has not read yet: unread counts, losses to retention, mentions.

For each room a user joined (`chatzeo.realm.User.joined`) their read marker
(`chatzeo.markers.ReadMarkers`) and the room's clock give, by arithmetic on two small
records and whatever the room's size:

- ``unread``: messages above the marker the room still holds;
- ``lost``: messages above the marker that retention (``max_messages``, ``max_age``)
  removed before the user read them: said, not silently skipped.

Mentions are found in the text of the unread messages themselves, so counting them
costs a range search of what is unread (never of the whole room). A message mentions
``name`` when it holds ``@name`` (any case, not inside a longer name) or starts with
``name:`` or ``name,`` (the IRC way of addressing someone); a user's own messages
mention nobody.

Pure functions over objects of the caller's connection, in the caller's thread and
transaction; nothing here writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .message import Message

__all__ = [
    "RoomUnread",
    "mentions",
    "mention_pattern",
    "room_unread",
    "unread_rooms",
    "latest_mentions",
    "MENTION_SCAN",
]

# `latest_mentions` looks at most this many of each room's newest messages: a listing
# of recent mentions must not cost a scan of a room's whole history.
MENTION_SCAN = 5000

# Characters of a user name (see chatzeo.validation); a '.' ends a name when no
# other name character follows it ("thanks @bob." mentions bob).
_NAME_CHAR = "A-Za-z0-9._\\-"


def mention_pattern(name: str) -> re.Pattern[str]:
    """The regular expression that finds a mention of ``name`` in a text."""
    quoted = re.escape(name)
    return re.compile(
        rf"(?<![{_NAME_CHAR}@])@{quoted}(?![A-Za-z0-9_-]|\.[A-Za-z0-9_-])"
        rf"|\A\s*{quoted}[:,](?:\s|\Z)",
        re.IGNORECASE,
    )


def mentions(message: Message, name: str, pattern: re.Pattern[str] | None = None) -> bool:
    """True if ``message`` mentions the user ``name`` (see the module docstring)."""
    if message.author is not None and message.author.lower() == name.lower():
        return False
    return (pattern or mention_pattern(name)).search(message.text) is not None


@dataclass(frozen=True)
class RoomUnread:
    """One joined room as its user left it: what is new, lost, and mentions them."""

    room: str
    unread: int
    lost: int
    mentions: int
    marker: int  # the key of the last message read, 0 if none
    last_key: int  # the room's newest key

    def as_json(self) -> dict[str, Any]:
        """The fields `chatzeo unread --json` prints."""
        return {
            "room": self.room,
            "unread": self.unread,
            "lost": self.lost,
            "mentions": self.mentions,
            "marker": self.marker,
            "last_key": self.last_key,
        }


def room_unread(user: Any, room: Any, *, count_mentions: bool = True) -> RoomUnread:
    """``user``'s (a `chatzeo.realm.User`) unread state in ``room`` (a `ChatSession`).

    ``unread`` and ``lost`` read the marker and the room's clock only; with
    ``count_mentions`` the unread messages are searched for mentions of the user.
    A room the user has no marker for counts every message it holds as unread.
    """
    markers = user.markers
    marker = markers.get(room) if markers is not None else 0
    if markers is not None and markers.position(room) is not None:
        unread, lost = markers.unread_count(room), markers.lost(room)
    elif markers is not None and room in markers:
        unread, lost = len(room.messages_after(marker)), 0
    else:
        unread, lost = len(room), 0
    found = 0
    if count_mentions and unread:
        pattern = mention_pattern(user.name)
        found = sum(
            1 for message in room.messages_after(marker) if mentions(message, user.name, pattern)
        )
    return RoomUnread(room.name, unread, lost, found, marker, room.last_key)


def unread_rooms(
    root: Any, user_name: str, *, count_mentions: bool = True
) -> list[RoomUnread]:
    """`room_unread` for every room ``user_name`` joined, in the order joined. A
    joined room that no longer exists is left out; an unknown user has none."""
    user = root.users.get(user_name)
    if user is None:
        return []
    return [
        room_unread(user, root.rooms[name], count_mentions=count_mentions)
        for name in user.joined
        if name in root.rooms
    ]


def latest_mentions(
    rooms: Iterable[Any], name: str, *, limit: int = 20, scan: int = MENTION_SCAN
) -> list[Message]:
    """The newest ``limit`` messages mentioning ``name`` among ``rooms``
    (`ChatSession`s), oldest first. Looks at most at the ``scan`` newest messages
    of each room."""
    pattern = mention_pattern(name)
    found: list[Message] = []
    for room in rooms:
        recent = room.latest(scan)
        hits = [message for message in recent if mentions(message, name, pattern)]
        found.extend(hits[-limit:])
    found.sort(key=lambda message: message.key)
    return found[-limit:] if limit else []
