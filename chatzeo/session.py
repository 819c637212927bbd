"""`ChatSession`: where a room's messages are stored, and how each reader finds the new ones.

Keys and order
    Messages live in an ``LOBTree`` keyed by a hybrid logical clock in microseconds:
    a new message's key is ``max(now, head + 1)``, where ``head`` is the largest key
    committed so far, kept in the room's `RoomClock`. Every post writes the clock, and
    the clock's conflict resolution accepts a concurrent post only if its key is larger
    than the one that committed first; otherwise the writer gets a `ConflictError` and
    retries with a fresh head. So keys are unique and strictly increasing in commit
    order, whatever the writers' clocks say; a writer whose clock lags gets ``head + 1``.
    (BTrees merge concurrent inserts of *different* keys into one bucket and refuse two
    inserts of the same key, see BTrees' ``MergeTemplate.c``; the clock adds the order.)

Cursors
    Because a later commit always has a larger key, "everything after the last key I
    returned" is exactly what a reader has not seen: ``new_messages`` is one range
    search from the cursor, never a scan. The cursor is per connection and never
    stored: ``_v_cursor`` holds it, and the connection keeps the same object in a
    registry keyed by the session's oid, so ghosting the session (cache GC,
    ``cacheMinimize()``, an invalidation) loses nothing.

Transactions
    `ChatSession.post` adds a message to the caller's transaction. `ChatSession.add_message`
    commits it through a private connection and transaction manager (`chatzeo.retry`),
    so it never commits, or aborts, anything else the caller has changed.

A session object and its cursor belong to the thread that owns its connection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.POSException import ConflictError

from .errors import NotInDatabase
from .message import Message, MessageKind, new_message_id
from .retry import DEFAULT_POLICY, RetryPolicy, run_in_transaction
from .validation import check_room_name, check_text, check_user_name

__all__ = ["ChatSession", "RoomClock"]

_CURSORS_ATTRIBUTE = "_chatzeo_cursors"


class RoomClock(Persistent):
    """The largest key committed in a room and the number of messages it holds.

    Written by every post. Its conflict resolution is what orders the room: see the
    module docstring.
    """

    def __init__(self) -> None:
        self.head = 0
        self.count = 0

    def _p_resolveConflict(  # noqa: N802 (ZODB's name)
        self, old: dict[str, int], committed: dict[str, int], new: dict[str, int]
    ) -> dict[str, int]:
        if new["head"] <= committed["head"]:
            raise ConflictError("a message with a later key committed first")
        resolved = dict(new)
        resolved["count"] = committed["count"] + new["count"] - old["count"]
        return resolved


class _Cursor:
    """The key of the last message a connection returned from `new_messages`."""

    __slots__ = ("key",)

    def __init__(self, key: int = 0) -> None:
        self.key = key


class ChatSession(Persistent):
    """A chat room: its messages, in commit order, and who is present.

    ``max_messages`` and ``max_age`` (seconds) cap the history; the oldest messages
    beyond either cap are removed as new ones are posted.
    """

    _v_cursor: _Cursor

    def __init__(
        self, name: str, *, max_messages: int | None = None, max_age: float | None = None
    ) -> None:
        self.name = check_room_name(name)
        self.max_messages = max_messages
        self.max_age = max_age
        self._messages = LOBTree()
        self._clock = RoomClock()
        # lease id -> (user name, expiry epoch seconds); see chatzeo.realm.
        self.presence = OOBTree()

    def __repr__(self) -> str:
        return f"<ChatSession {self.name!r}>"

    def __len__(self) -> int:
        return self._clock.count

    # -- writing ---------------------------------------------------------------

    def post(
        self,
        text: str,
        author: str | None = None,
        *,
        kind: MessageKind = "say",
        message_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Message:
        """Add a message to the caller's current transaction, without committing.

        Raises `InvalidInput` before changing anything if the text or author is bad.
        The caller commits, and retries on `ConflictError` as it sees fit.
        """
        text = check_text(text)
        if author is not None:
            author = check_user_name(author)
        return self._insert(text, author, kind, message_id or new_message_id(), clock)

    def _insert(
        self,
        text: str,
        author: str | None,
        kind: MessageKind,
        message_id: str,
        clock: Callable[[], float],
    ) -> Message:
        """Store an already validated message under the next key."""
        message = Message(
            message_id,
            self.name,
            max(int(clock() * 1_000_000), self._clock.head + 1),
            author,
            text,
            kind,
        )
        # The clock is changed first so that it is stored first: when its conflict
        # resolution refuses the commit, the server has not yet spent time merging
        # the (much bigger) bucket.
        self._clock.head = message.key
        self._clock.count += 1
        self._messages[message.key] = message.to_record()
        self._trim(message.key)
        return message

    def add_message(
        self,
        text: str,
        author: str | None = None,
        *,
        kind: MessageKind = "say",
        policy: RetryPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
    ) -> Message:
        """Store one message and commit it, retrying transient errors.

        The commit goes through a private connection and transaction manager, so the
        caller's uncommitted changes stay uncommitted, and the caller's connection sees
        the message at its next transaction boundary. Raises `InvalidInput` for bad
        input (nothing is written), `NotInDatabase` if this session has not been
        committed yet, and `RetryLimitExceeded` when conflicts or a lost server outlast
        the policy's bound.

        A commit cut off by a lost server may have landed; each retry first looks for
        the message (by id) at the keys earlier attempts used, so it is stored once.
        """
        text = check_text(text)
        if author is not None:
            author = check_user_name(author)
        if self._p_jar is None or self._p_oid is None:
            raise NotInDatabase(f"room {self.name!r} is not in a database; commit it first")
        oid = self._p_oid
        message_id = new_message_id()
        tried: list[int] = []

        def attempt(connection: Any) -> Message:
            session: ChatSession = connection.get(oid)
            for key in tried:
                record = session._messages.get(key)
                if record is not None and record[0] == message_id:
                    return Message.from_record(session.name, key, record)
            message = session._insert(text, author, kind, message_id, clock)
            tried.append(message.key)
            return message

        return run_in_transaction(
            self._p_jar.db(), attempt, what=f"posting to room {self.name!r}", policy=policy
        )

    def _trim(self, now_key: int) -> None:
        """Remove the oldest messages beyond ``max_messages`` or older than ``max_age``."""
        doomed: list[int] = []
        if self.max_age is not None:
            cutoff = now_key - int(self.max_age * 1_000_000)
            doomed.extend(self._messages.keys(max=cutoff, excludemax=True))
        if self.max_messages is not None:
            excess = self._clock.count - len(doomed) - self.max_messages
            if excess > 0:
                skip = len(doomed)
                for index, key in enumerate(self._messages.keys()):
                    if index >= skip + excess:
                        break
                    if index >= skip:
                        doomed.append(key)
        for key in doomed:
            del self._messages[key]
        self._clock.count -= len(doomed)

    # -- reading ---------------------------------------------------------------

    def new_messages(self) -> list[Message]:
        """The messages this connection has not returned before, oldest first.

        The first call on a connection returns the whole history (call `skip_to_end`
        first to start from now). Costs one range search from the cursor, and nothing
        at all when the room's clock, still in the cache, says nothing is new.
        """
        cursor = self._cursor()
        # A ghost clock was invalidated (something was posted) or evicted: loading it
        # would cost a round trip to the server just to learn what the range search,
        # which loads the changed bucket anyway, finds out by itself.
        if self._clock._p_changed is not None and self._clock.head <= cursor.key:
            return []
        messages = list(self._iter(min_key=cursor.key + 1))
        if messages:
            cursor.key = messages[-1].key
        return messages

    def skip_to_end(self) -> None:
        """Mark everything in this connection's current view as returned."""
        self._cursor().key = self._clock.head

    def latest(self, count: int) -> list[Message]:
        """The last ``count`` messages, oldest first. Loads only the buckets they are in."""
        return self.history(limit=count)

    def history(
        self,
        *,
        since: float | Message | None = None,
        before: float | Message | None = None,
        limit: int | None = None,
    ) -> list[Message]:
        """Messages strictly after ``since`` and strictly before ``before``, oldest first.

        A point is a `Message` or epoch seconds. With ``limit``, the newest ``limit`` of
        them when ``since`` is not given (paging back through history), the oldest
        ``limit`` when it is (paging forward).
        """
        low = _key_after(since)
        high = _key_before(before)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        if limit is None or since is not None:
            found: list[Message] = []
            for message in self._iter(min_key=low, max_key=high):
                if limit is not None and len(found) >= limit:
                    break
                found.append(message)
            return found
        return self._newest(limit, low, high)

    def _newest(self, limit: int, low: int, high: int | None) -> list[Message]:
        # BTrees iterate forwards only; walking back with maxKey(max=...) costs a
        # descent per message through nodes that are already in the cache.
        keys: list[int] = []
        bound = high
        tree = self._messages
        while len(keys) < limit:
            try:
                key = tree.maxKey() if bound is None else tree.maxKey(bound)
            except ValueError:
                break
            if key < low:
                break
            keys.append(key)
            bound = key - 1
        keys.reverse()
        return [Message.from_record(self.name, key, tree[key]) for key in keys]

    def _iter(self, min_key: int = 0, max_key: int | None = None) -> Iterator[Message]:
        name = self.name
        items = (
            self._messages.items(min=min_key)
            if max_key is None
            else self._messages.items(min=min_key, max=max_key)
        )
        for key, record in items:
            yield Message.from_record(name, key, record)

    def _cursor(self) -> _Cursor:
        try:
            return self._v_cursor
        except AttributeError:
            pass
        cursor = _Cursor()
        jar = self._p_jar
        if jar is not None and self._p_oid is not None:
            registry: dict[bytes, _Cursor] = jar.__dict__.setdefault(_CURSORS_ATTRIBUTE, {})
            cursor = registry.setdefault(self._p_oid, cursor)
        self._v_cursor = cursor
        return cursor


def _key_after(point: float | Message | None) -> int:
    if point is None:
        return 0
    if isinstance(point, Message):
        return point.key + 1
    return int(point * 1_000_000) + 1


def _key_before(point: float | Message | None) -> int | None:
    if point is None:
        return None
    if isinstance(point, Message):
        return point.key - 1
    return math.ceil(point * 1_000_000) - 1
