# mypy: disable-error-code="misc"
"""The contracts an application codes against: what each method returns and raises.

As in ``transaction.interfaces``, the contract lives here and the classes say
"See IChatSession". `tests/test_interfaces.py` verifies every class against its
interface (``zope.interface.verify``). Threads: an object read from a ZODB
connection belongs to the thread that owns that connection, unless an interface
says otherwise.

The declarations are made at the end of this module (``classImplements``), so the
modules that define the classes need not import this one (which would be circular);
importing `chatzeo` imports it.
"""

# ruff: noqa: N805 (zope.interface methods are declared without self)
from __future__ import annotations

from zope.interface import Attribute, Interface, classImplements

__all__ = [
    "IMessage",
    "IChatSession",
    "IReadMarkers",
    "IMessagePosted",
    "ISubscribers",
    "IChangeFeed",
    "IWatch",
    "IAsyncWatch",
]


class IMessage(Interface):
    """One chat message as it was stored: immutable, safe to keep and pass between threads."""

    id = Attribute("str: unique across rooms and databases, chosen before the first commit")
    room = Attribute("str: the name of the room it was posted to")
    key = Attribute("int: its place in the room, microseconds; larger means committed later")
    author = Attribute("str or None: who posted it (None for an anonymous post)")
    text = Attribute("str: the text, validated when posted (untrusted: escape it to show it)")
    kind = Attribute("'say' or 'action'")
    time = Attribute("float: the key as epoch seconds")

    def as_json():
        """A dict of plain JSON values: id, time, author, room, text, kind."""

    def to_record():
        """The ``(id, author, text, kind)`` tuple stored in the room."""


class IChatSession(Interface):
    """A chat room: a persistent object an application puts anywhere in its graph."""

    name = Attribute("str: the room's name")
    max_messages = Attribute("int or None: the oldest messages beyond it are removed")
    max_age = Attribute("float or None: seconds; older messages are removed")
    last_key = Attribute(
        "int: the key of the newest message ever posted, 0 if none; loads one small record"
    )

    def __len__():
        """How many messages the room holds now."""

    def post(text, author=None, *, kind="say", message_id=None, clock=None):
        """Add a message to the caller's current transaction and return it (an `IMessage`
        whose key conflict resolution may raise at commit). Commits nothing: the caller
        commits, and retries on `ConflictError`. Raises `InvalidInput` (a `ValueError`)
        for a bad text or author before changing anything. Once the transaction
        commits, `chatzeo.events.subscribers` are told (never if it aborts)."""

    def add_message(text, author=None, *, kind="say", policy=None, clock=None):
        """Store a message and commit it in a private connection and transaction, with
        bounded retries; the caller's own transaction is neither committed nor aborted.
        Returns the `IMessage` as stored (its final key). Raises `InvalidInput` for bad
        input, `NotInDatabase` if the room was never committed, `RetryLimitExceeded`
        when conflicts or a lost server outlast the policy."""

    def new_messages():
        """The messages this *connection* has not returned before, oldest first (the
        whole history on the first call). The cursor is volatile and per connection:
        for one long-lived connection (a script, a terminal), never a pooled one."""

    def skip_to_end():
        """Make `new_messages` return only what is committed after the current view."""

    def messages_after(key, *, limit=None):
        """The messages with keys above ``key`` (an int or an `IMessage`; 0 = from the
        start), oldest first, at most ``limit``. Keeps no state: the same answer on any
        connection. Raises `TypeError` for a key that is not an int, `ValueError` for a
        negative key or limit."""

    def find_message(message_id, *, from_key=0):
        """The `IMessage` with that id stored at ``from_key`` or later, or None."""

    def latest(count):
        """The last ``count`` messages, oldest first."""

    def history(*, since=None, before=None, limit=None):
        """Messages strictly between ``since`` and ``before`` (`IMessage` or epoch
        seconds), oldest first; with ``limit`` the newest ``limit`` of them, or the
        oldest when ``since`` is given. Raises `ValueError` for a negative limit."""


class IReadMarkers(Interface):
    """Per-user read markers: for each room, the key of the last message read.

    A persistent object the application keeps on its own user object. Concurrent
    writes (one user, several connections) merge by conflict resolution, the larger
    key winning, instead of failing with `ConflictError`."""

    def get(room):
        """The marker for ``room`` (an `IChatSession` or its name): an int key, 0 if none."""

    def mark(room, key):
        """Move the marker for ``room`` up to ``key`` (an int or an `IMessage`) in the
        caller's transaction. Never moves it back. Returns True if it moved (only then
        is the object written). Raises `TypeError`/`ValueError` for a bad key."""

    def mark_all_read(room):
        """`mark` the room's `last_key`; returns whether the marker moved."""

    def forget(room):
        """Drop the marker for ``room``; returns whether there was one."""

    def unread(room, *, limit=None):
        """The messages of ``room`` (an `IChatSession`) after its marker, oldest first."""

    def has_unread(room):
        """True if ``room`` holds a message after its marker; loads one small record."""

    def rooms():
        """The room names that have a marker, sorted."""


class IMessagePosted(Interface):
    """Sent to `ISubscribers` (and ``zope.event``) once a post's transaction committed."""

    message = Attribute("the `IMessage`; its key is the one the post proposed")
    room = Attribute("str: the room's name")
    room_oid = Attribute("bytes: the room's oid, for `chatzeo.watch` or ``connection.get``")
    database = Attribute("the `ZODB.DB` it was committed to")

    def stored_message():
        """The message as stored, with the key conflict resolution gave it, read through
        a fresh connection (one round trip or two). Falls back to ``message``."""


class ISubscribers(Interface):
    """Who is told of committed posts in this process. Thread-safe."""

    def subscribe(subscriber):
        """Call ``subscriber(event)`` with each `IMessagePosted` from now on, in the
        committing thread. Returns a function that unsubscribes it."""

    def notify(event):
        """Call every subscriber, then ``zope.event.notify`` if installed; their errors
        are logged, never raised."""


class IChangeFeed(Interface):
    """Wakes one reader thread when a commit touches the objects it watches."""

    def watch(objects):
        """Watch exactly these committed persistent objects from now on."""

    def wait(timeout=None):
        """Block until a watched object changed (True) or ``timeout`` seconds passed
        (False)."""

    def close():
        """Stop listening."""


class IWatch(Interface):
    """Messages of one room as they are committed, by any process, with its own
    connection. Iterating yields each `IMessage` once, in commit order, forever."""

    key = Attribute("int: the key of the last message returned (where a resumed watch starts)")
    closed = Attribute("bool: True once `close` released the connection and the feed")

    def __iter__():
        """Yield messages as they arrive; ends after `stop` or `close`. A `for` loop
        left by ``break`` closes the watch (CPython frees the iterator at once)."""

    def poll(timeout=None):
        """The messages after `key`, waiting up to ``timeout`` seconds for the first;
        [] if none came (or the watch was stopped). A lost server is waited out, not
        raised."""

    def stop():
        """From any thread: make a waiting `poll` or iteration return soon."""

    def close():
        """Release the connection and the feed (owning thread). Idempotent."""


class IAsyncWatch(Interface):
    """`IWatch` for asyncio: ``async for message in chatzeo.awatch(db, room)``."""

    key = Attribute("int or None: the key of the last message returned (None before opening)")
    closed = Attribute("bool: True once the watch's connection and feed are released")

    def __aiter__():
        """Yield messages as they arrive; cancelling the task ends it cleanly."""

    def aclose():
        """Release everything (a coroutine). Idempotent."""


def _declare() -> None:
    from .delivery import ChangeFeed
    from .events import MessagePosted, Subscribers
    from .markers import ReadMarkers
    from .message import Message
    from .session import ChatSession
    from .watch import AsyncWatch, Watch

    classImplements(Message, IMessage)
    classImplements(ChatSession, IChatSession)
    classImplements(ReadMarkers, IReadMarkers)
    classImplements(MessagePosted, IMessagePosted)
    classImplements(Subscribers, ISubscribers)
    classImplements(ChangeFeed, IChangeFeed)
    classImplements(Watch, IWatch)
    classImplements(AsyncWatch, IAsyncWatch)


_declare()
