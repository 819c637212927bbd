"""The messages the terminal's two threads exchange: requests and events.

Requests go from the UI thread to the worker: `ChatScreen` (`chatzeo.terminal.app`)
builds them from typed lines and keys and hands them to `ClientWorker.submit`
(`chatzeo.terminal.worker`), which queues them and rings the worker's own wake-up
(never the commit feed). A request is `Outgoing` (a message to post), `Earlier` (a
page of history) or one of the slash commands of `chatzeo.terminal.commands` that
the worker answers (``/join``, ``/who``, ...).

Events go from the worker thread to the UI thread: the worker passes each to its
``deliver`` callable, which the terminal makes hand it over with
``loop.call_soon_threadsafe``; `ChatScreen.on_event` then draws it. Every event is
an immutable value, so nothing is shared between the threads but these values.

Neither side waits for the other: a request is answered by zero or more events,
matched by content (`Landed`/`NotSent` name the `Outgoing` id; `EarlierPage` its
`Earlier.before`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..message import Message, MessageKind
from ..unread import RoomUnread
from .commands import (
    Create,
    Invite,
    Join,
    Kick,
    Members,
    Mentions,
    Msg,
    Part,
    Query,
    Rooms,
    Switch,
    Topic,
    Who,
)

__all__ = [
    "Outgoing",
    "Earlier",
    "Request",
    "Event",
    "Joined",
    "Arrived",
    "Landed",
    "NotSent",
    "EarlierPage",
    "Notice",
    "Problem",
    "Parted",
    "Activity",
    "PresenceChanged",
    "TopicChanged",
    "ConnectionChanged",
    "MentionList",
]


# -- requests: UI thread -> worker ---------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """A message to post; ``id`` is the UI's handle on it while it is pending."""

    id: int
    text: str
    kind: MessageKind = "say"


@dataclass(frozen=True)
class Earlier:
    """Fetch the ``count`` messages before ``before`` in the current room."""

    count: int
    before: Message


Request = (
    Outgoing | Earlier | Join | Rooms | Who | Switch | Part | Topic | Mentions
    | Create | Invite | Kick | Members | Msg | Query
)


# -- events: worker -> UI thread -----------------------------------------------


@dataclass(frozen=True)
class Joined:
    """Now in ``room`` (just opened, or ``switched`` to); ``page`` holds its latest
    history, oldest first, or when ``new`` messages came since the user's read
    marker, the newest `CATCH_UP` of those; ``lost`` more were removed by retention
    before they were read. ``topic`` is the room's, as `ChatClient.topic` gives it;
    ``rooms`` every room open now, in order (keys of `ChatClient.open_rooms`: a
    private room's is its label). ``shown`` is how the room is named on screen
    (``#lobby``, ``#plans (private)``, ``@bob``)."""

    room: str
    page: tuple[Message, ...]
    new: int = 0
    lost: int = 0
    topic: tuple[str, str, float] | None = None
    switched: bool = False
    rooms: tuple[str, ...] = ()
    shown: str = field(default="", compare=False)


@dataclass(frozen=True)
class Parted:
    """``room`` is closed; ``rooms`` are the ones still open."""

    room: str
    rooms: tuple[str, ...]


@dataclass(frozen=True)
class Activity:
    """Unread state of the other open rooms as stored (at start: what came while
    away); ``known`` names every room on the server (for completion)."""

    rooms: tuple[RoomUnread, ...]
    known: tuple[str, ...] = ()


@dataclass(frozen=True)
class PresenceChanged:
    """In ``room``, ``came`` are now present and ``parted`` left it (still online
    elsewhere); ``present`` is everyone there now. With ``room`` "", ``quit`` names
    those who left the chat (no live connection any more) from any open room."""

    room: str
    came: tuple[str, ...] = ()
    parted: tuple[str, ...] = ()
    quit: tuple[str, ...] = ()
    present: tuple[str, ...] = ()


@dataclass(frozen=True)
class TopicChanged:
    """Someone (``topic[1]``) changed the topic of ``room``."""

    room: str
    topic: tuple[str, str, float] | None


@dataclass(frozen=True)
class ConnectionChanged:
    """The connection to the server was lost (``up`` False) or is back."""

    up: bool


@dataclass(frozen=True)
class MentionList:
    """The answer to `Mentions`: the latest messages mentioning the user, oldest first."""

    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Arrived:
    """New messages, oldest first per room: the current room's to be shown, the
    others' to be counted (each message names its room)."""

    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Landed:
    """Outgoing message ``id`` is stored, as the message whose id is ``stored``;
    ``messages`` are what arrived up to it."""

    id: int
    messages: tuple[Message, ...]
    stored: str | None = None


@dataclass(frozen=True)
class NotSent:
    """Outgoing message ``id`` was given up; ``reason`` says why, in one line."""

    id: int
    reason: str


@dataclass(frozen=True)
class EarlierPage:
    """The answer to `Earlier`: the messages before ``before``, oldest first."""

    before: Message
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Notice:
    """Lines of information (``/who``, ``/rooms``)."""

    lines: tuple[str, ...]


@dataclass(frozen=True)
class Problem:
    """A request failed; ``text`` says why, in one line."""

    text: str


Event = (
    Joined | Arrived | Landed | NotSent | EarlierPage | Notice | Problem | Parted | Activity
    | PresenceChanged | TopicChanged | ConnectionChanged | MentionList
)
