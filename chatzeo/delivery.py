"""Push delivery: wake a reader as soon as a commit touches what it watches.

A `ChangeFeed` hears every commit, remote or local, without a timer: an idle reader
costs nothing. Where the news comes from depends on the storage (`_source`):

ZEO client, FileStorage (``_AdapterSource``)
    When any client commits, the ZEO server pushes the changed oids to every other
    client; ZEO's client calls ``invalidate(tid, oids)`` on the database's MVCC
    adapter, which passes them to each open connection. The feed registers itself
    beside those connections. No request goes to the server. From a `chatzeo serve`
    only the commits touching what this client holds arrive (`chatzeo.server.fanout`), and
    the watched objects' new states come with them, so the woken reader finds them
    in its cache.

RelStorage on PostgreSQL (``_NotifySource``)
    RelStorage has no push: it polls when a transaction starts. A trigger installed
    by ``chatzeo init-db`` notifies each written object's own channel, and one
    `chatzeo.postgres.Listener` per process and database (one extra connection,
    whatever the number of feeds) listens to the channels its feeds watch and
    hands each feed its oids.

Threads
    ``_invalidate`` and ``_invalidateCache`` run on ZEO's IO thread (a remote
    commit, a reconnection), on the committing thread (a commit by another
    connection of this process, with the adapter's lock held) or on the PostgreSQL
    listener's thread. They only set a `threading.Event` and call ``notify`` (which
    must therefore be thread-safe and quick, such as ``loop.call_soon_threadsafe``).
    Never touch a connection from them.

    `ChangeFeed.wait` runs in the reader's own thread, the one that owns the
    connection; after it returns True the reader starts a new transaction and reads.

A storage the feed cannot attach to raises `TypeError`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from . import postgres

__all__ = ["ChangeFeed"]


class ChangeFeed:
    """Tells its reader thread when a commit changed one of the watched objects.

    Also fires after a (re)connection to the server, when the client's cache was
    dropped (or notifications were lost) and anything may have changed.
    """

    def __init__(self, db: Any, notify: Callable[[], None] | None = None) -> None:
        self._notify = notify
        self._watched: frozenset[bytes] = frozenset()
        self._changed = threading.Event()
        self._source = _source(db, self)

    def watch(self, objects: Iterable[Any]) -> None:
        """Watch exactly these persistent objects (already committed) from now on."""
        self._watched = frozenset(obj._p_oid for obj in objects)
        self._source.want(self._watched)

    def also_notify(self, notify: Callable[[], None]) -> None:
        """Call ``notify`` too whenever the feed fires, from the firing thread (see
        "Threads": it must be thread-safe and quick). A reader that waits on more
        than the feed (the terminal's worker) waits on its own event instead, set
        here, and then asks `wait` with timeout 0 whether the feed fired."""
        before = self._notify
        if before is None:
            self._notify = notify
            return

        def both() -> None:
            before()
            notify()

        self._notify = both

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a watched object changed since the last `wait`, or ``timeout``
        seconds pass. Returns True if something changed; clears the signal."""
        changed = self._changed.wait(timeout)
        if changed:
            self._changed.clear()
            self._source.settle()
        return changed

    def close(self) -> None:
        """Stop listening (also safe after the database was closed)."""
        self._source.close()

    # -- called by the source (see "Threads") ----------------------------------

    def _invalidate(self, tid: bytes | None, oids: Iterable[bytes]) -> None:
        if not self._watched.isdisjoint(oids):
            self._fire()

    def _invalidateCache(self) -> None:  # noqa: N802 (ZODB's name)
        self._fire()

    def _fire(self) -> None:
        self._changed.set()
        if self._notify is not None:
            self._notify()


class _Source(Protocol):
    def settle(self) -> None:
        """Make sure the reader's next transaction sees what fired the feed."""

    def want(self, oids: frozenset[bytes]) -> None:
        """The feed watches these oids now (a source may have their states pushed)."""

    def close(self) -> None:
        """Stop feeding."""


def _source(db: Any, feed: ChangeFeed) -> _Source:
    # RelStorage first: it has an ``_instances`` of its own, of another kind.
    dsn = postgres.dsn_of(db.storage)
    if dsn is not None:
        return _NotifySource(dsn, feed)
    adapter = db._mvcc_storage
    if hasattr(adapter, "_instances") and hasattr(adapter, "_lock"):
        return _AdapterSource(adapter, feed)
    raise TypeError(f"cannot watch commits of {type(adapter).__name__}")


class _AdapterSource:
    """The feed sits among the MVCC adapter's connections (ZEO, FileStorage)."""

    def __init__(self, adapter: Any, feed: ChangeFeed) -> None:
        self._adapter = adapter
        self._feed = feed
        # A chatzeo ZEO client can have the watched objects' new states pushed with
        # their invalidations (chatzeo.server.fanout), so the woken reader loads nothing.
        self._want = getattr(adapter._storage, "fanout_want", None)
        with adapter._lock:
            adapter._instances.add(feed)

    def want(self, oids: frozenset[bytes]) -> None:
        if self._want is not None:
            self._want(id(self), oids)

    def settle(self) -> None:
        # The adapter hands invalidations to the connections while holding its
        # lock, after ours; taking it here means our connection already has them
        # when the reader begins its next transaction.
        with self._adapter._lock:
            pass

    def close(self) -> None:
        if self._want is not None:
            # The storage may be closed already: nothing to withdraw then.
            with contextlib.suppress(Exception):
                self._want(id(self), ())
        with self._adapter._lock:
            instances = getattr(self._adapter, "_instances", None)
            if instances is not None:
                instances.discard(self._feed)


class _NotifySource:
    """This process's PostgreSQL LISTEN connection (RelStorage), shared by all feeds."""

    def __init__(self, dsn: str, feed: ChangeFeed) -> None:
        self._feed = feed
        self._listener = postgres.shared_listener(dsn)

    def _heard(self, oids: frozenset[bytes] | None) -> None:
        if oids is None:
            self._feed._invalidateCache()
        else:
            self._feed._invalidate(None, oids)

    def want(self, oids: frozenset[bytes]) -> None:
        self._listener.subscribe(self, oids, self._heard)
        # The reader's snapshot may predate the LISTEN that just began: a commit in
        # between was never announced, so let the reader look once.
        self._feed._fire()

    def settle(self) -> None:
        # Nothing to wait for: PostgreSQL sent the notification after the commit,
        # so the reader's next transaction (RelStorage polls then) includes it.
        pass

    def close(self) -> None:
        self._listener.subscribe(self, frozenset())
        postgres.release_listener(self._listener)
