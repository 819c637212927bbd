"""`ChatSession`: where a room's messages are stored, and how each reader finds the new ones.

Keys and order
    Messages are keyed by a hybrid logical clock in microseconds and live in two
    places: the room's `RoomClock` holds the newest ones in ``pending``, a tuple of
    ``(key, record)`` entries, and an ``LOBTree`` holds the older ones. A post
    appends an entry with the tentative key ``max(now, head + 1)`` to the clock's
    ``pending`` and sets its ``head`` (the largest key) and ``count``, and writes
    nothing else, unless it finds `FLUSH` or more entries pending: then, with chance
    `FLUSH_CHANCE` (always from ``2 * FLUSH`` on), it first moves those entries, all
    committed already, into the tree in the same transaction and sets the clock's
    ``flushed`` (no key in the tree is above it); its own entry stays pending. The
    order is made inside the commit: ZODB resolves a conflict on the clock in commit
    order (ZEO on the server, serially; RelStorage in the committing client), and
    `RoomClock._p_resolveConflict` appends the entries a post added after the ones
    that committed first, raising each key to ``max(key, previous + 1)`` from the
    committed head, and drops from the committed entries those a flush moved. So
    concurrent posts are not refused, and keys are unique and strictly increasing in
    commit order, whatever the writers' clocks say. Only two flushes of the same
    entries collide: the later is refused (`ConflictError`, the writer retries), as
    BTrees would refuse its inserts of the same keys into one bucket anyway (it
    merges inserts of *different* keys only, see BTrees' ``MergeTemplate.c``).
    Every pending key is above every key in the tree, and a stored state holds each
    message in exactly one of the two places. `add_message` returns the key the
    message was stored under, read back after its commit; `post` returns the
    tentative key, which resolution may raise.

Cursors
    Because a later commit always has a larger key, "everything after the last key I
    returned" is exactly what a reader has not seen: ``new_messages`` is a range
    search from the cursor, in the tree and then in the clock's pending entries, never
    a scan; when the clock's ``flushed`` is at or below the cursor (the common case)
    the clock alone answers, so delivering a post loads one small record. The cursor
    is per connection and never stored: ``_v_cursor`` holds it, and the connection
    keeps the same object in a registry keyed by the session's oid, so ghosting the
    session (cache GC, ``cacheMinimize()``, an invalidation) loses nothing.

Transactions
    `ChatSession.post` adds a message to the caller's transaction. `ChatSession.add_message`
    commits it through a private connection and transaction manager (`chatzeo.retry`),
    so it never commits, or aborts, anything else the caller has changed.

A session object and its cursor belong to the thread that owns its connection.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.POSException import ConflictError, POSKeyError, StateLoadError

from .errors import MalformedRecord, NotInDatabase, UnsafeRecord
from .events import announce_after_commit
from .message import Message, MessageKind, Unreadable, new_message_id
from .records import (
    MAX_KEY,
    MAX_PENDING,
    MAX_ROOM_NAME,
    clock_problem,
    key_problem,
    name_problem,
    room_problem,
)
from .retry import DEFAULT_POLICY, RetryPolicy, run_in_transaction
from .validation import check_room_name, check_topic, check_user_name, plain_text

__all__ = ["ChatSession", "RoomClock", "FLUSH", "FLUSH_CHANCE"]

_CURSORS_ATTRIBUTE = "_chatzeo_cursors"


Entry = tuple[int, tuple[Any, ...]]  # (key, message record), as in RoomClock.pending

# How many messages wait in a room's clock before a post may move them into the tree
# (from 2 * FLUSH on, it must). Larger means fewer flushes but a bigger clock record
# written by every post.
FLUSH = 32
# The chance that a post finding FLUSH or more entries flushes them. Every writer that
# saw the same entries would flush them at once, and all but the first would be
# refused; with this chance few try together.
FLUSH_CHANCE = 0.25


class RoomClock(Persistent):
    """The newest messages of a room, their largest key and how many messages it holds.

    Written by every post, and the only object most posts write. Its conflict
    resolution is what orders the room: see the module docstring. A state loaded
    from the database that breaks `chatzeo.records.clock_problem` (a plain ZEO
    server stores anything) loads anyway; ``problem`` then says what is wrong,
    readers see only its well-formed entries, and posts to it are refused.
    """

    # Rooms stored before ``pending`` existed load without it, and without
    # ``flushed``: no key in the tree is above it, None while that is not known.
    pending: tuple[Entry, ...] = ()
    flushed: int | None = None
    # How many messages were ever posted here (``count`` less those retention
    # removed). Clocks stored before it existed load with None: `posted` then
    # takes ``count``, as if retention had removed nothing until the next post.
    total: int | None = None
    # Set when a loaded state breaks the rules; volatile, so recomputed at each load.
    _v_problem: str | None = None

    def __init__(self) -> None:
        self.head = 0
        self.count = 0
        self.pending = ()
        self.flushed = 0
        self.total = 0

    @property
    def posted(self) -> int:
        """How many messages were ever posted to the room; see ``total``. Never
        below `message_count`, whatever a malformed state holds."""
        count = self.message_count()
        total = self.__dict__.get("total")
        return total if type(total) is int and total >= count else count

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(state)
        # Structure only, once per load; each message record is checked when a
        # reader turns it into a Message.
        problem = clock_problem(state if state is not None else {}, messages=False)
        if problem is not None:
            self._v_problem = problem

    @property
    def problem(self) -> str | None:
        """What is wrong with this clock's stored state, or None."""
        # Reading a _v_ attribute does not load a ghost: load it, so the check ran.
        self._p_activate()
        return self._v_problem

    def entries(self) -> tuple[Entry, ...]:
        """The pending ``(key, record)`` entries a reader may use: all of them for a
        well-formed clock, else those with int keys above the one before."""
        if self.problem is None:
            return self.pending
        return _usable_entries(self.__dict__.get("pending", ()))

    def newest_key(self) -> int:
        """The room's largest key (``head``), 0 if the stored one is unusable."""
        if self.problem is None:
            head: int = self.head
            return head
        stored = self.__dict__.get("head", 0)
        entries = self.entries()
        usable = stored if type(stored) is int and key_problem(stored) is None else 0
        return max(usable, entries[-1][0] if entries else 0)

    def flushed_key(self) -> int | None:
        """``flushed``, or None (unknown: look in the tree too) if it is unusable."""
        return self.flushed if self.problem is None else None

    def message_count(self) -> int:
        """``count``, or the usable pending entries' number if it is unusable."""
        if self.problem is None:
            count: int = self.count
            return count
        stored = self.__dict__.get("count")
        return stored if type(stored) is int and stored >= 0 else len(self.entries())

    def _p_resolveConflict(  # noqa: N802 (ZODB's name)
        self, old: dict[str, Any], committed: dict[str, Any], new: dict[str, Any]
    ) -> dict[str, Any]:
        # Runs on the ZEO server (or in a RelStorage client), one commit at a time in
        # commit order, on plain states. Every step below is linear in the pending
        # entries, which the rules bound (MAX_PENDING): a state that breaks them is
        # not resolved at all, so a hostile one cannot make the server spin.
        for state in (old, committed, new):
            if clock_problem(state, messages=False) is not None:
                raise ConflictError("a room clock state breaks chatzeo's record rules")
        old_pending = tuple(old.get("pending", ()))
        new_pending = tuple(new.get("pending", ()))
        committed_pending = tuple(committed.get("pending", ()))
        resolved = dict(new)
        resolved["count"] = committed["count"] + new["count"] - old["count"]
        if "total" in new or "total" in committed:
            # A state without it (written by older code) counts ``count`` instead.
            resolved["total"] = _posted(committed) + _posted(new) - _posted(old)
        # The writer dropped the first ``dropped`` of the entries it saw (a flush moved
        # them into the tree, or retention removed them), kept the rest, and appended.
        dropped = _dropped(old_pending, new_pending)
        kept = len(old_pending) - dropped
        if (
            len(new_pending) > kept
            and new["head"] == new_pending[-1][0]
            and committed_pending[:dropped] == old_pending[:dropped]
            and (not dropped or committed.get("flushed") == old.get("flushed"))
            and (
                new.get("flushed") == old.get("flushed")
                # A flush moved exactly the entries committed before it (not, say,
                # entries an earlier post of the same transaction appended).
                or (old_pending and not kept and new.get("flushed") == old_pending[-1][0])
            )
        ):
            # Order the new entries after everything committed first. When the writer
            # did not flush, ``committed_pending`` may be shorter than ``old_pending``
            # (a flush committed meanwhile): those entries' keys are <= committed head.
            head = committed["head"]
            appended = []
            for key, record in new_pending[kept:]:
                head = max(key, head + 1)
                appended.append((head, record))
            merged = committed_pending[dropped:] + tuple(appended)
            if len(merged) > MAX_PENDING or head > MAX_KEY:
                # The writer retries, finds the clock full and flushes it first.
                raise ConflictError("the room's clock is full; flush it first")
            resolved["head"] = head
            resolved["pending"] = merged
            if not dropped:
                resolved.pop("flushed", None)
                if "flushed" in committed:
                    resolved["flushed"] = committed["flushed"]
            return resolved
        if committed_pending == old_pending and committed["head"] == old["head"]:
            return resolved
        # Both moved (or trimmed) the same entries: the later writer retries.
        raise ConflictError("the room's newest messages were moved by another commit")


def _posted(state: dict[str, Any]) -> int:
    total = state.get("total")
    return state["count"] if total is None else total  # type: ignore[no-any-return]


def _dropped(old: tuple[Entry, ...], new: tuple[Entry, ...]) -> int:
    """How many leading entries of ``old`` are missing from ``new``, which keeps the
    others in front (``len(old)`` when it keeps none).

    Keys are unique in a well-formed clock, so the only candidate is the position of
    ``new``'s first key in ``old``: one lookup and one comparison, linear in all.
    """
    if not new or not old:
        return len(old)
    first = new[0][0]
    position = bisect.bisect_left(old, first, key=_entry_key)
    if position < len(old) and new[: len(old) - position] == old[position:]:
        return position
    return len(old)


def _usable_entries(pending: Any) -> tuple[Entry, ...]:
    """The entries of a malformed ``pending`` a reader can place: (int key, record)
    pairs with keys in range and above the previous usable one."""
    if not isinstance(pending, tuple | list):
        return ()
    usable: list[Entry] = []
    previous = 0
    for entry in pending[:MAX_PENDING]:
        if (
            type(entry) is tuple
            and len(entry) == 2
            and key_problem(entry[0]) is None
            and entry[0] > previous
        ):
            usable.append(entry)
            previous = entry[0]
    return tuple(usable)


class _Cursor:
    """The key of the last message a connection returned from `new_messages`."""

    __slots__ = ("key",)

    def __init__(self, key: int = 0) -> None:
        self.key = key


class ChatSession(Persistent):
    """A chat room: its messages, in commit order, and who is present.

    ``max_messages`` and ``max_age`` (seconds) cap the history; the oldest messages
    beyond either cap are removed as new ones are posted.

    A stored state that breaks `chatzeo.records.room_problem` loads anyway, with
    ``problem`` saying what is wrong: readers get placeholders, posts are refused
    with `MalformedRecord`. So does a room whose clock or message tree cannot be
    read: each unreadable part becomes one placeholder message.
    """

    _v_cursor: _Cursor
    # ``(text, set by, epoch seconds)`` (text "" once cleared), or None: rooms
    # stored before topics existed load without one. Anyone may set it (as on IRC
    # without +t, or in Slack); the setter is stored with it and shown, and a
    # guarded server checks that it names them.
    topic: tuple[str, str, float] | None = None
    _v_problem: str | None = None

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(state)
        problem = room_problem(state)
        if problem is None and not (
            isinstance(state["_messages"], LOBTree)
            and isinstance(state["_clock"], RoomClock)
            and isinstance(state["presence"], OOBTree)
        ):
            problem = "room's messages, clock or presence is of the wrong class"
        if problem is not None:
            self._v_problem = problem

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
        clock = self._clock_or_none()
        return clock.message_count() if clock is not None else 0

    @property
    def problem(self) -> str | None:
        """What is wrong with this room's stored records (itself or its clock), or None."""
        clock = self._clock_or_none()
        if self._v_problem is not None:
            return self._v_problem
        if clock is None:
            return "room's clock cannot be read"
        return clock.problem

    def watch_target(self) -> Persistent:
        """The object every post to this room changes: what a `ChangeFeed` watches."""
        clock: RoomClock = self._clock
        return clock

    def display_name(self) -> str:
        """The room's name, or a placeholder if the stored one breaks the rules."""
        name = self._field("name")
        if name_problem("room", name, MAX_ROOM_NAME) is not None:
            return "[malformed room name]"
        return name  # type: ignore[no-any-return]

    def _field(self, name: str) -> Any:
        """A stored attribute without AttributeError for a state that lacks it."""
        self._p_activate()
        return self.__dict__.get(name)

    def _clock_or_none(self) -> RoomClock | None:
        """The room's clock, loaded, or None if it cannot be read."""
        clock = self._field("_clock")
        if not isinstance(clock, RoomClock):
            return None
        try:
            clock._p_activate()
        except _DATA_ERRORS:
            return None
        return clock

    def _tree_or_none(self) -> LOBTree | None:
        tree = self._field("_messages")
        return tree if isinstance(tree, LOBTree) else None

    # -- writing ---------------------------------------------------------------

    def set_topic(self, text: str, by: str, *, clock: Callable[[], float] = time.time) -> None:
        """Set the room's topic (``""`` clears it) in the caller's transaction.

        Raises `InvalidInput` for a bad topic or user name, changing nothing. Writes
        the room's own record, which posts do not write, so it conflicts only with
        another topic change (the later one is retried and wins)."""
        text = check_topic(text)
        by = check_user_name(by)
        # A cleared topic keeps who cleared it: others are told who did.
        self.topic = (text, by, float(clock()))

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
        text = plain_text(text)  # a CheckedText was checked where it came in
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
        """Append an already validated message to the clock's pending entries under a
        tentative key (the server's conflict resolution may raise it). Raises
        `MalformedRecord` if the room's stored records break the rules."""
        problem = self.problem
        if problem is not None:
            raise MalformedRecord(f"room {self.display_name()!r}", problem)
        try:
            return self._append(text, author, kind, message_id, clock)
        except _DATA_ERRORS as error:
            # A bucket of the tree a flush or retention loads cannot be read.
            raise MalformedRecord(
                f"room {self.display_name()!r}", f"its message tree cannot be read ({error!r:.80})"
            ) from None

    def _append(
        self,
        text: str,
        author: str | None,
        kind: MessageKind,
        message_id: str,
        clock: Callable[[], float],
    ) -> Message:
        room_clock = self._clock
        message = Message(
            message_id,
            self.name,
            max(int(clock() * 1_000_000), room_clock.head + 1),
            author,
            text,
            kind,
        )
        # The clock is changed first so that it is stored first: when its conflict
        # resolution refuses a flush, the server has not yet spent time merging the
        # (much bigger) bucket.
        room_clock.head = message.key
        room_clock.total = room_clock.posted + 1
        room_clock.count += 1
        pending = room_clock.pending
        if len(pending) >= FLUSH and (
            len(pending) >= 2 * FLUSH or random.random() < FLUSH_CHANCE
        ):
            # Only entries that are already committed move, under their final keys;
            # this post's own entry stays pending, so resolution can still order it.
            room_clock.flushed = pending[-1][0]
            for key, record in pending:
                self._messages[key] = record
            pending = ()
        room_clock.pending = (*pending, (message.key, message.to_record()))
        self._trim(message.key)
        announce_after_commit(self, message)
        return message

    def add_message(
        self,
        text: str,
        author: str | None = None,
        *,
        kind: MessageKind = "say",
        policy: RetryPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
        read_back: bool = True,
    ) -> Message:
        """Store one message and commit it, retrying transient errors.

        The commit goes through a private connection and transaction manager, so the
        caller's uncommitted changes stay uncommitted, and the caller's connection sees
        the message at its next transaction boundary. Raises `InvalidInput` for bad
        input (nothing is written), `NotInDatabase` if this session has not been
        committed yet, and `RetryLimitExceeded` when conflicts or a lost server outlast
        the policy's bound.

        Returns the message as stored: its key is the one conflict resolution gave it,
        read back after the commit (if that read fails, the key the commit proposed,
        which is never larger). With ``read_back=False`` the key the commit proposed,
        without that read: for a caller that reads the room next anyway (the
        terminal), where the message comes with its final key.

        ``text`` is checked (`chatzeo.validation.check_text`) unless it is a
        `chatzeo.validation.CheckedText`, which was checked where it came in.

        A commit cut off by a lost server may have landed; each retry first looks for
        the message (by id) at or after the keys earlier attempts proposed (resolution
        only raises keys), so it is stored once.
        """
        text = plain_text(text)  # a CheckedText was checked where it came in
        if author is not None:
            author = check_user_name(author)
        if self._p_jar is None or self._p_oid is None:
            raise NotInDatabase(f"room {self.name!r} is not in a database; commit it first")
        oid = self._p_oid
        message_id = new_message_id()
        tried: list[int] = []

        def attempt(connection: Any) -> Message:
            session: ChatSession = connection.get(oid)
            if tried:
                found = session._find(message_id, min(tried))
                if found is not None:
                    return found
            message = session._insert(text, author, kind, message_id, clock)
            tried.append(message.key)
            return message

        def stored(connection: Any, message: Message) -> Message:
            found = connection.get(oid)._find(message_id, message.key)
            return message if found is None else found

        return run_in_transaction(
            self._p_jar.db(),
            attempt,
            what=f"posting to room {self.name!r}",
            policy=policy,
            then=stored if read_back else None,
        )

    def _find(self, message_id: str, min_key: int) -> Message | None:
        """The message ``message_id`` if it is stored at ``min_key`` or later.

        Looks in the clock first, where a message stays until a flush; the tree holds
        keys from ``min_key`` on only if the first pending key is above it."""
        room_clock = self._clock_or_none()
        pending = room_clock.entries() if room_clock is not None else ()
        tree: Any = (
            self._items(min_key) if not pending or pending[0][0] > min_key else ()
        )
        for key, record in itertools.chain(pending, tree):
            if key >= min_key and type(record) is tuple and record and record[0] == message_id:
                return Message.from_record(self.display_name(), key, record)
        return None

    def _trim(self, now_key: int) -> None:
        """Remove the oldest messages beyond ``max_messages`` or older than ``max_age``.

        The oldest are in the tree; only a room holding fewer than about `FLUSH`
        messages trims its clock's pending entries.
        """
        doomed: list[int] = []
        if self.max_age is not None:
            cutoff = now_key - int(self.max_age * 1_000_000)
            doomed.extend(key for key, _ in self._entries(0, cutoff - 1, careful=False))
        if self.max_messages is not None:
            excess = self._clock.count - len(doomed) - self.max_messages
            if excess > 0:
                start = doomed[-1] + 1 if doomed else 0
                for key, _ in self._entries(start, careful=False):
                    if excess <= 0:
                        break
                    doomed.append(key)
                    excess -= 1
        if not doomed:
            return
        room_clock = self._clock
        gone = set(doomed)
        kept = tuple(entry for entry in room_clock.pending if entry[0] not in gone)
        if len(kept) != len(room_clock.pending):
            room_clock.pending = kept
        for key in doomed:
            self._messages.pop(key, None)
        room_clock.count -= len(doomed)

    # -- reading ---------------------------------------------------------------

    def new_messages(self) -> list[Message]:
        """The messages this connection has not returned before, oldest first.

        The first call on a connection returns the whole history (call `skip_to_end`
        first to start from now). Costs one range search from the cursor, and nothing
        at all when the room's clock, still in the cache, says nothing is new.
        """
        cursor = self._cursor()
        room_clock = self._field("_clock")
        # A ghost clock was invalidated (something was posted) or evicted; one still
        # in the cache answers "nothing new" without a round trip.
        if (
            isinstance(room_clock, RoomClock)
            and room_clock._p_changed is not None
            and room_clock.newest_key() <= cursor.key
        ):
            return []
        room_clock = self._clock_or_none()
        flushed = room_clock.flushed_key() if room_clock is not None else None
        if room_clock is not None and flushed is not None and flushed <= cursor.key:
            # No key in the tree is above the cursor: the clock alone holds what is new.
            entries = [entry for entry in room_clock.entries() if entry[0] > cursor.key]
        else:
            entries = list(self._entries(cursor.key + 1))
        if entries:
            cursor.key = entries[-1][0]
        name = self.display_name()
        return [Message.from_record(name, key, record) for key, record in entries]

    def skip_to_end(self) -> None:
        """Mark everything in this connection's current view as returned."""
        room_clock = self._clock_or_none()
        if room_clock is not None:
            self._cursor().key = room_clock.newest_key()

    # -- readers that keep no state (any connection, e.g. a web request's) -----

    @property
    def last_key(self) -> int:
        """The key of the newest message posted here (0 if none ever was).

        What a reader stores to mean "I have read everything up to now", and what
        ``messages_after`` takes to return only later messages. Loads one small record.
        """
        room_clock = self._clock_or_none()
        return room_clock.newest_key() if room_clock is not None else 0

    def messages_after(self, key: int | Message, *, limit: int | None = None) -> list[Message]:
        """The messages with keys above ``key`` (a key or a `Message`), oldest first;
        with ``limit``, only the oldest ``limit`` of them (page on from the last one).

        Unlike `new_messages` it keeps no state, so any connection gives the same
        answer: the caller keeps the key (in a `chatzeo.ReadMarkers`, a URL, an SSE
        ``Last-Event-ID``). ``0`` means from the start. Costs what `new_messages` costs:
        one range search, and only the room's clock when ``key`` is recent. Raises
        `TypeError` for a key that is not an int and `ValueError` for a negative key
        or limit.
        """
        if isinstance(key, Message):
            key = key.key
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError(f"a message key is an int, not {type(key).__name__}")
        if key < 0:
            raise ValueError(f"a message key is >= 0, not {key}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        room_clock = self._clock_or_none()
        # Also keeps keys beyond the tree's 64-bit range (from a URL, say) out of it.
        if limit == 0 or room_clock is None or room_clock.newest_key() <= key:
            return []
        flushed = room_clock.flushed_key()
        if flushed is not None and flushed <= key:
            entries = [entry for entry in room_clock.entries() if entry[0] > key][:limit]
        else:
            entries = list(itertools.islice(self._entries(key + 1), limit))
        name = self.display_name()
        return [Message.from_record(name, entry_key, record) for entry_key, record in entries]

    def find_message(self, message_id: str, *, from_key: int = 0) -> Message | None:
        """The message with id ``message_id`` if it is stored at ``from_key`` or later,
        else None. Scans from ``from_key``: pass the key its post proposed (conflict
        resolution only ever raises a key), and it looks at a few entries only."""
        return self._find(message_id, from_key)

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
        # A room whose own records break the rules says so first, in every page.
        problem = self.problem
        if problem is not None and limit is not None:
            if limit == 0:
                return []
            limit -= 1
        if limit is None or since is not None:
            found: list[Message] = []
            for message in self._iter(min_key=low, max_key=high):
                if limit is not None and len(found) >= limit:
                    break
                found.append(message)
        else:
            found = self._newest(limit, low, high) if limit > 0 else []
        if problem is not None:
            key = found[0].key - 1 if found else low
            found.insert(0, Message.from_record(self.display_name(), max(key, 1), Unreadable(
                f"this room's records break chatzeo's rules: {problem}")))
        return found

    def _newest(self, limit: int, low: int, high: int | None) -> list[Message]:
        if limit == 0:
            return []
        room_clock = self._clock_or_none()
        newest = [
            entry
            for entry in (room_clock.entries() if room_clock is not None else ())
            if entry[0] >= low and (high is None or entry[0] <= high)
        ][-limit:]
        # BTrees iterate forwards only; walking back with maxKey(max=...) costs a
        # descent per message through nodes that are already in the cache.
        bound = high
        tree = self._tree_or_none()
        bounds: list[int] | None = None
        failing = False  # one placeholder for a run of unreadable buckets
        found = 0
        while tree is not None and found < limit:
            try:
                key = tree.maxKey() if bound is None else tree.maxKey(bound)
                if key < low:
                    break
                newest.append((key, tree[key]))
            except _DATA_ERRORS as error:
                if isinstance(error, ValueError):
                    break  # nothing at or below the bound
                # Step below the unreadable bucket, by the bounds its parents route by.
                bounds = _bucket_bounds(tree) if bounds is None else bounds
                below = [b for b in bounds if bound is None or b <= bound]
                if not failing:
                    newest.append(_unreadable(max(below[-1] if below else low, low), error))
                    found += 1
                failing = True
                if not below or below[-1] <= low:
                    break
                bound = below[-1] - 1
                continue
            failing = False
            found += 1
            bound = key - 1
        if tree is None or room_clock is None:
            newest.append(_unreadable(low, self.problem))
        newest.sort(key=_entry_key)
        name = self.display_name()
        return [Message.from_record(name, key, record) for key, record in newest[-limit:]]

    def _iter(self, min_key: int = 0, max_key: int | None = None) -> Iterator[Message]:
        name = self.display_name()
        for key, record in self._entries(min_key, max_key):
            yield Message.from_record(name, key, record)

    def _entries(
        self, min_key: int = 0, max_key: int | None = None, *, careful: bool = True
    ) -> Iterator[Entry]:
        """The ``(key, record)`` pairs from ``min_key`` to ``max_key`` (inclusive), in
        key order, from the tree and the clock's pending entries (all newer, unless a
        client bypassing chatzeo wrote the tree directly: merging keeps order anyway).
        A part that cannot be read is one placeholder entry (``careful``), or raises."""
        items = self._items(min_key, max_key, careful)
        room_clock = self._clock_or_none()
        if room_clock is None:
            items = itertools.chain(items, [_unreadable(min_key, self.problem)])
        pending = [
            entry
            for entry in (room_clock.entries() if room_clock is not None else ())
            if entry[0] >= min_key and (max_key is None or entry[0] <= max_key)
        ]
        if not pending:
            return items
        return heapq.merge(items, pending, key=_entry_key)

    def _items(
        self, min_key: int, max_key: int | None = None, careful: bool = True
    ) -> Iterator[Entry]:
        """The tree's items in the range; if a bucket cannot be read, one placeholder
        entry just after the last key read stands for the rest of the tree."""
        tree = self._tree_or_none()
        if tree is None:
            yield _unreadable(min_key, self.problem)
            return
        start = min_key
        bounds: list[int] | None = None
        failing = False  # one placeholder for a run of unreadable buckets
        while True:
            last = start - 1
            try:
                items = tree.items(min=start) if max_key is None else tree.items(
                    min=start, max=max_key
                )
                for entry in items:
                    last = entry[0]
                    failing = False
                    yield entry
                return
            except _DATA_ERRORS as error:
                if not careful:
                    raise
                if not failing:
                    yield _unreadable(last + 1, error)
                failing = True
            # Go on from the next bucket, by the bounds its parents route by.
            bounds = _bucket_bounds(tree) if bounds is None else bounds
            # Past what was read, and past ``start``: each round moves on.
            after = [b for b in bounds if b > max(last, start)]
            if not after or (max_key is not None and after[0] > max_key):
                return
            start = after[0]

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


def _entry_key(entry: Entry) -> int:
    return entry[0]


# What a record that cannot be loaded raises (not a lost server or a conflict: those
# are TransientErrors and reach the caller's retry).
_DATA_ERRORS = (StateLoadError, UnsafeRecord, POSKeyError, TypeError, ValueError, AttributeError)


def _bucket_bounds(tree: LOBTree) -> list[int]:
    """The smallest key each bucket of ``tree`` may hold but the first, as its tree
    nodes route by them: loads the nodes, never a bucket."""
    bounds: list[int] = []
    nodes = [tree]
    while nodes and len(bounds) < 10_000_000:
        node = nodes.pop()
        try:
            state = node.__getstate__()
        except _DATA_ERRORS:
            continue
        if not state or len(state) == 1:
            continue  # empty, or its one bucket inline
        data = state[0]
        for index in range(0, len(data), 2):
            if index:
                bounds.append(data[index - 1])
            if isinstance(data[index], LOBTree):
                nodes.append(data[index])
    return sorted(bound for bound in bounds if type(bound) is int)


def _unreadable(key: int, why: object) -> Entry:
    """A placeholder entry for a part of a room that cannot be read."""
    if isinstance(why, str):
        reason = why
    elif why is None:
        reason = "a part of the room cannot be read"
    else:
        reason = f"a part of the room cannot be read ({type(why).__name__})"
    return (max(key, 1), Unreadable(reason))  # type: ignore[return-value]


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
