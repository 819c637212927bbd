"""`Message`: the immutable record a reader gets back for each stored chat message.

In the database a message is a plain tuple ``(id, author, text, kind)`` stored as a
value of the room's BTree, under its key (see `chatzeo.session`). Plain tuples keep
the buckets small, and let any ZEO server merge concurrent inserts without importing
chatzeo. `Message` is built from that tuple when read.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Message", "MessageKind", "new_message_id"]

MessageKind = Literal["say", "action"]
# A record stores its kind as an index into this tuple.
_KINDS: tuple[MessageKind, ...] = ("say", "action")


def new_message_id() -> str:
    """A fresh, globally unique message id (32 hex digits)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message as it was stored.

    ``key`` is its position in the room's history (microseconds, see
    `chatzeo.session`); ``time`` is the same instant in epoch seconds; ``id`` is unique
    across rooms and databases, chosen by the writer before the first attempt so a
    retried commit can tell whether an earlier attempt already landed.
    """

    id: str
    room: str
    key: int
    author: str | None
    text: str
    kind: MessageKind = "say"

    @property
    def time(self) -> float:
        """When the message was posted, in epoch seconds."""
        return self.key / 1_000_000

    def __str__(self) -> str:
        return self.text

    def as_json(self) -> dict[str, Any]:
        """The fields `chatzeo tail --json` prints."""
        return {
            "id": self.id,
            "key": self.key,
            "time": self.time,
            "author": self.author,
            "room": self.room,
            "text": self.text,
            "kind": self.kind,
        }

    @classmethod
    def from_record(cls, room: str, key: int, record: Any) -> Message:
        """Build a message from a stored ``(id, author, text, kind)`` tuple.

        Any client can write any record, so a malformed one becomes a visible
        placeholder instead of an exception in every reader.
        """
        try:
            message_id, author, text, kind = record
            if not (isinstance(message_id, str) and isinstance(text, str)):
                raise TypeError
            if author is not None and not isinstance(author, str):
                raise TypeError
            return cls(message_id, room, key, author, text, _KINDS[kind])
        except (TypeError, ValueError, IndexError):
            return cls(f"malformed-{key}", room, key, None, "[malformed message record]")

    def to_record(self) -> tuple[str, str | None, str, int]:
        """The tuple stored in the room's BTree."""
        return (self.id, self.author, self.text, _KINDS.index(self.kind))
