"""Watching a room across processes: each message once, in commit order, as it is committed.

    for message in chatzeo.watch(db, room, after="now"):   # a thread, a script
        ...
    async for message in chatzeo.awatch(db, room):          # asyncio
        ...

A `Watch` opens its own connection (with its own transaction manager) and a
`chatzeo.delivery.ChangeFeed` on the room's clock, so it works the same over ZEO,
FileStorage, RelStorage with chatzeo's NOTIFY trigger, from any process. It keeps
its place as a key (`Watch.key`, the last message returned): a watch started
``after=key`` resumes exactly there (an SSE ``Last-Event-ID``, say), with nothing
lost and nothing repeated, because later commits always have larger keys. It never
holds a pooled connection of the application's (a web request's connection goes
back to the pool; the watch uses its own), and it reads in batches of ``batch``
messages, so a watch from the start of a long room does not load it at once.

A lost server is waited out (the feed fires when ZEO reconnects), never raised;
a room that does not exist raises `NoSuchRoom` at once.

Threads
    A `Watch` belongs to the thread that iterates it (that thread also closes it);
    `Watch.stop` may be called from any thread, and wakes a waiting iteration.
    Leaving a ``for`` loop by ``break`` closes the watch: CPython finalizes the
    dropped iterator at once, in that thread. An `AsyncWatch` runs its `Watch` on
    one worker thread of its own and waits for the feed on the event loop, so
    cancelling the task that iterates it ends the iteration at once; the connection
    is closed on that worker thread right after.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import transaction
from ZODB.POSException import ReadConflictError

from .delivery import ChangeFeed
from .errors import NoSuchRoom, NotInDatabase
from .message import Message
from .realm import ROOT_KEY
from .retry import is_transient

__all__ = ["Watch", "AsyncWatch", "watch", "awatch"]

Start = int | Message | Literal["now"]
# How long a watch waits before reading again after a transient error (a lost server
# reconnecting, a pack racing a read), when the feed does not fire first.
RETRY_INTERVAL = 1.0


def watch(db: Any, room: Any, *, after: Start = "now", batch: int = 100) -> Watch:
    """A `Watch` of ``room`` (a committed `ChatSession` from any connection, its oid,
    or a room name in chatzeo's realm) from ``after``: ``"now"``, a key, or a
    `Message`; ``0`` replays the whole history first. See `IWatch`."""
    return Watch(db, room, after=after, batch=batch)


def awatch(db: Any, room: Any, *, after: Start = "now", batch: int = 100) -> AsyncWatch:
    """The asyncio `AsyncWatch` of ``room``; the same arguments as `watch`. It opens
    nothing until first iterated (so a missing room raises there)."""
    return AsyncWatch(db, room, after=after, batch=batch)


class Watch:
    """See `IWatch`."""

    key: int

    def __init__(
        self,
        db: Any,
        room: Any,
        *,
        after: Start = "now",
        batch: int = 100,
        notify: Any = None,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, not {batch}")
        self._batch = batch
        self._stopped = threading.Event()
        self._closed = False
        self._feed: ChangeFeed | None = None
        self._manager = transaction.TransactionManager(explicit=True)
        self._connection = db.open(transaction_manager=self._manager)
        try:
            self._feed = ChangeFeed(db, notify)
            self._manager.begin()
            try:
                session = _resolve(self._connection, room)
                self._oid = session._p_oid
                # Watch first, then read where to start: a commit in between fires.
                self._feed.watch([session._clock])
                self.key = session.last_key if after == "now" else _start_key(after)
            finally:
                self._manager.abort()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<Watch after {self.key}{' closed' if self._closed else ''}>"

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Message]:
        return self._messages()

    def _messages(self) -> Iterator[Message]:
        try:
            while not self._stopped.is_set():
                yield from self.poll(None)
        finally:
            self.close()

    def poll(self, timeout: float | None = None) -> list[Message]:
        """See `IWatch`."""
        if self._closed:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopped.is_set():
            batch = self.read()
            if batch:
                return batch
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            if batch is None:  # a transient error: read again soon, even without news
                remaining = RETRY_INTERVAL if remaining is None else min(remaining, RETRY_INTERVAL)
            assert self._feed is not None
            self._feed.wait(remaining)
        return []

    def read(self) -> list[Message] | None:
        """One read of the messages after `key` (at most ``batch``), without waiting;
        None if a transient error (a lost server) prevented it."""
        self._manager.begin()
        try:
            room = self._connection.get(self._oid)
            batch: list[Message] = room.messages_after(self.key, limit=self._batch)
        except ReadConflictError:
            return None  # a pack removed a revision this view needed; the next one has it
        except Exception as error:
            if is_transient(self._connection.db(), error):
                return None
            raise
        finally:
            self._manager.abort()
        if batch:
            self.key = batch[-1].key
        return batch

    def stop(self) -> None:
        """See `IWatch`."""
        self._stopped.set()
        if self._feed is not None:
            self._feed._fire()

    def close(self) -> None:
        """See `IWatch`."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self._feed is not None:
            self._feed.close()
        with contextlib.suppress(Exception):  # no transaction open: nothing to abort
            self._manager.abort()
        self._connection.close()

    @property
    def closed(self) -> bool:
        """True once `close` released the connection and the feed."""
        return self._closed


class AsyncWatch:
    """See `IAsyncWatch`."""

    def __init__(self, db: Any, room: Any, *, after: Start = "now", batch: int = 100) -> None:
        self._db = db
        self._room = room
        self._after = after
        self._batch = batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatzeo-awatch")
        self._watch: Watch | None = None
        self._changed = asyncio.Event()
        self._released: Future[None] | None = None

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._messages()

    @property
    def key(self) -> int | None:
        """The key of the last message returned; None before the watch opened."""
        return None if self._watch is None else self._watch.key

    async def _messages(self) -> AsyncIterator[Message]:
        loop = asyncio.get_running_loop()

        def notify() -> None:  # on ZEO's IO thread (see chatzeo.delivery)
            # RuntimeError: the loop is closed, nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._changed.set)

        def open_watch() -> None:  # on the worker thread, which then owns the watch
            self._watch = Watch(
                self._db, self._room, after=self._after, batch=self._batch, notify=notify
            )

        try:
            if self._released is not None:
                return
            if self._watch is None:
                await loop.run_in_executor(self._executor, open_watch)
            watching = self._watch
            assert watching is not None
            while True:
                # Cleared before reading: a commit during the read sets it again.
                self._changed.clear()
                batch = await loop.run_in_executor(self._executor, watching.read)
                if batch:
                    for message in batch:
                        yield message
                    continue
                if batch is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), RETRY_INTERVAL)
                else:
                    await self._changed.wait()
        finally:
            self._release()

    def _release(self) -> Future[None]:
        """Close the watch on its worker thread, after any read still running there."""
        if self._released is None:

            def close() -> None:
                if self._watch is not None:
                    self._watch.close()

            self._released = self._executor.submit(close)
            self._executor.shutdown(wait=False)
        return self._released

    async def aclose(self) -> None:
        """See `IAsyncWatch`."""
        await asyncio.wrap_future(self._release())

    @property
    def closed(self) -> bool:
        """True once the watch's connection and feed are released."""
        return self._released is not None and self._released.done()


def _resolve(connection: Any, room: Any) -> Any:
    """The room ``room`` names, loaded in ``connection``."""
    if isinstance(room, str):
        chat_root = connection.root().get(ROOT_KEY)
        session = chat_root.rooms.get(room) if chat_root is not None else None
        if session is None:
            raise NoSuchRoom(room)
        return session
    oid = room if isinstance(room, bytes) else getattr(room, "_p_oid", None)
    if oid is None:
        raise NotInDatabase(f"room {getattr(room, 'name', room)!r} is not committed yet")
    session = connection.get(oid)
    if not hasattr(session, "messages_after"):
        raise TypeError(f"oid {oid!r} is a {type(session).__name__}, not a ChatSession")
    return session


def _start_key(after: Any) -> int:
    if isinstance(after, Message):
        return after.key
    if isinstance(after, bool) or not isinstance(after, int):
        raise TypeError(f'after is "now", a key or a Message, not {after!r}')
    if after < 0:
        raise ValueError(f"a message key is >= 0, not {after}")
    return after
