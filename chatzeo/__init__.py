"""chatzeo: a chat whose whole shared state is one ZODB object graph, shared through ZEO.

What the package offers, by where it lives (each import below says what it is for).
The wings build on it and are imported by their own paths: `chatzeo.server` (the
guarded ZEO server), `chatzeo.terminal` (the terminal client), `chatzeo.cli` (the
command line), `chatzeo.testing` (real servers and fixtures for tests and benchmarks).
"""

# One participant's view, as the command line and the terminal use it.
from .client import ChatClient

# Opening a database: ZEO address, zodburi URI, ZConfig file or embedded FileStorage.
from .database import open_db

# Push delivery: wake a reader when a commit touches its room.
from .delivery import ChangeFeed

# Errors, all under ChatError; bad input is also a ValueError.
from .errors import (
    ChatError,
    DatabaseNotPrepared,
    InvalidInput,
    InvalidMessage,
    InvalidName,
    InvalidTarget,
    MalformedRecord,
    NoSuchRoom,
    NoSuchUser,
    NotAMember,
    NotInDatabase,
    PrivateRoomsNeedTLS,
    RetryLimitExceeded,
    ServerUnavailable,
    TooManyConnections,
    UnsafeRecord,
)

# Events after commit: subscribers told of each post once its transaction committed.
from .events import MessagePosted, subscribe, subscribers

# The contracts (zope.interface) an application codes against; declares the classes.
from .interfaces import (
    IAsyncWatch,
    IChangeFeed,
    IChatSession,
    IMessage,
    IMessagePosted,
    IReadMarkers,
    ISubscribers,
    IWatch,
)

# Per-user read markers, kept on the application's own user objects.
from .markers import ReadMarkers

# The immutable record a reader gets for each message.
from .message import Message

# Rooms by name, users, connection counting and presence leases.
from .realm import ChatRoot, User, get_root

# Retrying a unit of work in a private transaction.
from .retry import RetryPolicy, run_in_transaction

# Storing messages: a room, its time-keyed BTree and per-connection cursors.
from .session import ChatSession

# Watching a room across processes, with its own connection: for, and async for.
from .watch import AsyncWatch, Watch, awatch, watch

__all__ = [
    "ChatSession",
    "Message",
    "ChatRoot",
    "User",
    "get_root",
    "open_db",
    "ChangeFeed",
    "ChatClient",
    "ReadMarkers",
    "watch",
    "awatch",
    "Watch",
    "AsyncWatch",
    "subscribe",
    "subscribers",
    "MessagePosted",
    "IChatSession",
    "IMessage",
    "IReadMarkers",
    "IMessagePosted",
    "ISubscribers",
    "IChangeFeed",
    "IWatch",
    "IAsyncWatch",
    "RetryPolicy",
    "run_in_transaction",
    "ChatError",
    "DatabaseNotPrepared",
    "InvalidInput",
    "InvalidMessage",
    "InvalidName",
    "InvalidTarget",
    "MalformedRecord",
    "NoSuchRoom",
    "NoSuchUser",
    "NotAMember",
    "NotInDatabase",
    "PrivateRoomsNeedTLS",
    "RetryLimitExceeded",
    "ServerUnavailable",
    "TooManyConnections",
    "UnsafeRecord",
]
