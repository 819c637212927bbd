"""The application's own object graph: tickets, each holding a chatzeo discussion.

    root["tickets"]            IOBTree: number -> Ticket
    Ticket.discussion          chatzeo.ChatSession

The root entry is a BTree, not a class of ours, on purpose: chatzeo's own commands
share this database and load the root mapping, which makes a ghost of each value in
it; they load only allowlisted classes (`chatzeo.allowlist`), and refuse any other.
Keep an application's own classes below such a container, never directly in the root.

A ticket's discussion is an ordinary attribute holding a `ChatSession`. The same room
is also registered by name in chatzeo's realm (``ticket-N``), which is what lets a
terminal user reach it: ``chatzeo send --room ticket-3 ...``, ``chatzeo chat``.

Everything here changes objects in the caller's transaction (the request's, under
pyramid_tm); nothing commits by itself. Belongs to the thread of its connection.
"""

from __future__ import annotations

from typing import Any

from BTrees.IOBTree import IOBTree
from persistent import Persistent

from chatzeo import ChatSession, Message, get_root
from chatzeo.allowlist import class_factory as chatzeo_class_factory
from chatzeo.validation import check_text, check_user_name

__all__ = [
    "Ticket", "Refused", "AlreadyClosed", "add_ticket", "newest", "class_factory", "MAX_TITLE"
]

MAX_TITLE = 200


class Refused(ValueError):
    """A request the application refuses: the user can correct it (status 400)."""


class AlreadyClosed(Refused):
    """Someone closed this ticket first (status 409)."""


class Ticket(Persistent):
    """One ticket: a title, open or closed, and its discussion."""

    def __init__(self, number: int, title: str, discussion: ChatSession) -> None:
        self.number = number
        self.title = title
        self.discussion = discussion
        self.closed_by: str | None = None

    @property
    def closed(self) -> bool:
        return self.closed_by is not None

    def close(self, by: str) -> Message:
        """Close the ticket and say so in its discussion: both in the caller's
        transaction, so both happen or neither does. Raises `AlreadyClosed`, or
        `chatzeo.InvalidInput` for a bad name (nothing changed then)."""
        by = check_user_name(by)
        if self.closed_by is not None:
            raise AlreadyClosed(f"ticket {self.number} was already closed by {self.closed_by}")
        message = self.discussion.post(f"closed by {by}", by)
        self.closed_by = by
        return message


def newest(tickets: IOBTree, count: int = 50) -> list[Ticket]:
    """The ``count`` newest tickets, newest first."""
    found: list[Ticket] = []
    for number in reversed(tickets.keys()):
        if len(found) >= count:
            break
        found.append(tickets[number])
    return found


def add_ticket(connection: Any, tickets: IOBTree, title: str, author: str) -> Ticket:
    """A new ticket, numbered after the newest. Two requests adding at once insert the
    same number into one bucket, which conflicts: the loser's request is retried
    (pyramid_retry) and takes the next number. Raises `Refused` or `chatzeo.InvalidInput`
    (nothing changed then)."""
    title = check_text(title).strip()
    author = check_user_name(author)
    if not title or len(title) > MAX_TITLE or "\n" in title:
        raise Refused(f"a title is one line of 1-{MAX_TITLE} characters")
    number = tickets.maxKey() + 1 if tickets else 1
    discussion = get_root(connection).room(f"ticket-{number}")
    # Added to the request's connection now, not at commit: a post's after-commit event
    # hooks the transaction of the room's connection (chatzeo.events).
    connection.add(discussion)
    ticket = tickets[number] = Ticket(number, title, discussion)
    discussion.post(f"opened: {title}", author)
    return ticket


_OURS = {f"{__name__}.Ticket": Ticket}


def class_factory(connection: Any, module: str, name: str) -> Any:
    """chatzeo's allowlist plus this application's class: a record naming any other
    global (``os.system``, say) is refused before anything is imported."""
    ours = _OURS.get(f"{module}.{name}")
    return ours if ours is not None else chatzeo_class_factory(connection, module, name)
