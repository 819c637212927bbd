"""`Message`: the immutable value a reader gets back for each stored chat message.

In the database a message is a plain tuple ``(id, author, text, kind)`` (its rules
are `chatzeo.records`'), stored under its key in the room clock's pending entries
or in the room's BTree (see `chatzeo.session`). Plain tuples keep the records small,
and let any ZEO server merge concurrent inserts without importing chatzeo.
`Message.from_record` builds a `Message` from that tuple when it is read; a tuple
that breaks the rules becomes a placeholder message, never an exception.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from .records import KINDS, message_problem

__all__ = ["Message", "MessageKind", "new_message_id", "PLACEHOLDER", "Unreadable"]

MessageKind = Literal["say", "action"]
# A record stores its kind as an index into this tuple (chatzeo.records.KINDS).
_KINDS: tuple[MessageKind, ...] = ("say", "action")
assert _KINDS == KINDS
# The text a reader shows for a record that breaks chatzeo.records' rules.
PLACEHOLDER = "[malformed message record]"


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Stands, in a reader's entries, for a part of a room that cannot be loaded
    (a bucket holding a float key, a class chatzeo does not load, ...)."""

    reason: str


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
    # For a placeholder: what is wrong with the stored record (`chatzeo.records`).
    problem: str | None = None

    @property
    def malformed(self) -> bool:
        """True for a placeholder standing in for a record that breaks the rules."""
        return self.problem is not None

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
            "time": self.time,
            "author": self.author,
            "room": self.room,
            "text": self.text,
            "kind": self.kind,
            **({"malformed": self.problem} if self.problem is not None else {}),
        }

    @classmethod
    def from_record(cls, room: str, key: int, record: Any) -> Message:
        """Build a message from a stored ``(id, author, text, kind)`` tuple.

        Any client of a plain ZEO server can write any record, so one that breaks
        `chatzeo.records.message_problem` becomes a placeholder (text `PLACEHOLDER`,
        no author, ``problem`` saying what is wrong) instead of an exception in
        every reader.
        """
        problem = record.reason if isinstance(record, Unreadable) else message_problem(record)
        if problem is None:
            message_id, author, text, kind = record
            return cls(message_id, room, key, author, text, _KINDS[kind])
        return cls(f"malformed-{key}", room, key, None, PLACEHOLDER, "say", problem)

    def to_record(self) -> tuple[str, str | None, str, int]:
        """The tuple stored in the room's BTree."""
        return (self.id, self.author, self.text, _KINDS.index(self.kind))
