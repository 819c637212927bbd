"""Push delivery: wake a reader as soon as a commit touches what it watches.

When any client commits, the ZEO server pushes the changed oids to every other
client; ZEO's client calls ``invalidate(tid, oids)`` on the database's MVCC adapter,
which passes them to each open connection. A `ChangeFeed` registers itself beside
those connections and so hears every commit, remote or local, without a timer and
without a request to the server: an idle reader costs nothing.

Threads
    ``_invalidate`` and ``_invalidateCache`` run on ZEO's IO thread (a remote commit,
    a reconnection) or on the committing thread (a commit by another connection of
    this process), with the adapter's lock held. They only set a `threading.Event`
    and call ``notify`` (which must therefore be thread-safe and quick, such as
    ``loop.call_soon_threadsafe``). Never touch a connection from them.

    `ChangeFeed.wait` runs in the reader's own thread, the one that owns the
    connection; after it returns True the reader starts a new transaction and reads.

Storages without invalidation push (a FileStorage shared by no other process) still
get local commits; a storage the feed cannot attach to raises `TypeError`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ChangeFeed"]


class ChangeFeed:
    """Tells its reader thread when a commit changed one of the watched objects.

    Also fires after a (re)connection to the server, when the client's cache was
    dropped and anything may have changed.
    """

    def __init__(self, db: Any, notify: Callable[[], None] | None = None) -> None:
        self._adapter = db._mvcc_storage
        if not hasattr(self._adapter, "_instances"):
            raise TypeError(f"cannot watch commits of {type(self._adapter).__name__}")
        self._notify = notify
        self._watched: frozenset[bytes] = frozenset()
        self._changed = threading.Event()
        with self._adapter._lock:
            self._adapter._instances.add(self)

    def watch(self, objects: Iterable[Any]) -> None:
        """Watch exactly these persistent objects (already committed) from now on."""
        self._watched = frozenset(obj._p_oid for obj in objects)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a watched object changed since the last `wait`, or ``timeout``
        seconds pass. Returns True if something changed; clears the signal."""
        changed = self._changed.wait(timeout)
        if changed:
            self._changed.clear()
            # The adapter hands invalidations to the connections while holding its
            # lock, after ours; taking it here means our connection already has
            # them when the reader begins its next transaction.
            with self._adapter._lock:
                pass
        return changed

    def close(self) -> None:
        """Stop listening (also safe after the database was closed)."""
        with self._adapter._lock:
            instances = getattr(self._adapter, "_instances", None)
            if instances is not None:
                instances.discard(self)

    # -- called by the MVCC adapter (see "Threads") -----------------------------

    def _invalidate(self, tid: bytes, oids: Iterable[bytes]) -> None:
        if not self._watched.isdisjoint(oids):
            self._fire()

    def _invalidateCache(self) -> None:  # noqa: N802 (ZODB's name)
        self._fire()

    def _fire(self) -> None:
        self._changed.set()
        if self._notify is not None:
            self._notify()
