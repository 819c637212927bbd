"""chatzeo: a chat whose whole shared state is one ZODB object graph, shared through ZEO.

What the package offers, by where it lives:
"""

# Storing messages: a room, its time-keyed BTree and per-connection cursors.
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
    NotInDatabase,
    RetryLimitExceeded,
    ServerUnavailable,
    TooManyConnections,
    UnsafeRecord,
)

# The immutable record a reader gets for each message.
from .message import Message

# Rooms by name, users, connection counting and presence leases.
from .realm import ChatRoot, User, get_root

# Retrying a unit of work in a private transaction.
from .retry import RetryPolicy, run_in_transaction
from .session import ChatSession

__all__ = [
    "ChatSession",
    "Message",
    "ChatRoot",
    "User",
    "get_root",
    "open_db",
    "ChangeFeed",
    "ChatClient",
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
    "NotInDatabase",
    "RetryLimitExceeded",
    "ServerUnavailable",
    "TooManyConnections",
    "UnsafeRecord",
]
