"""Watched fan-out: a commit reaches only the ZEO connections that hold what it changed.

Stock ZEO sends every commit's oids to every connection of the storage
(`StorageServer.invalidate`), which costs the server about 11 us per connected client
per commit and wakes every client process for every commit. `install_fanout`
replaces that broadcast on a `chatzeo serve`.

What the server knows
    Every object a ZEO client caches reached it through this connection: a
    ``loadBefore`` (prefetch too) or its own ``store``. `FanoutMixin` records those
    oids per connection (`WatchIndex`), and a commit is sent, with only the oids
    that connection watches, to the connections that watch one of them. The record
    is never shrunk while the connection lives (a client never says what it evicted),
    so the filter is conservative: it can send too much, never too little. A
    connection that watches more than `MAX_WATCHED` oids is sent everything, as
    stock ZEO would, so a client loading the whole database costs the server at
    most that much memory.

The client's last tid
    A ZEO client starts each transaction "before" the last tid it heard of. A
    connection that hears nothing would keep starting transactions at an old tid
    and load objects it never saw (a room it joins, a room it read before, anything
    after a reconnection) as they were then. So:

    * A connection the server has told everything up to now is *current*. The first
      commit that skips a current connection sends it one small notice,
      ``info({"chatzeo_behind": tid})``, and it is no longer current; later skipped
      commits send it nothing.
    * `FanoutClientStorage` keeps the largest such tid. Its ``lastTransaction``
      (which ZODB asks at every transaction start) sees that the notice is newer
      than its last tid and first makes one round trip, ``chatzeo_sync``, whose
      reply is the server's last tid. Invalidations are sent once the loop step
      of their commit is over (FileStorage makes a commit durable only after
      telling the server, so stock ZEO schedules them too), and that reply is
      scheduled the same way, so it leaves after every invalidation up to its tid;
      the client's IO thread applies messages in order, so when the reply arrives
      they have all been applied, and the connection is current again.
    * An invalidation makes its receiver current too (it has then heard of
      everything up to that tid), and so does the connection's own commit.
    * A load that returns a revision which is no longer current (the client's
      transaction started before a commit nobody here was told of, as nobody here
      held the object then) is preceded by an invalidation of that oid at the last
      tid: what stock ZEO would have sent. Without it a ZODB connection would keep
      that old revision in its cache into later transactions.

Push
    A client may ask (``chatzeo_want``, at most `MAX_WANTED` oids) for the new
    states of some objects to come with their invalidations: a `ChangeFeed` asks
    for its room's clock. The state (read back from the storage once the commit
    is durable) travels in ``info({"chatzeo_push": (tid, oids, states)})``, and
    `FanoutClientStorage` stores it in its cache as current from ``tid`` before
    its ZODB connections and feeds hear of the commit, so the woken reader loads
    it from there: delivering a post costs the reader no request.

    So a transaction sees every commit the server finished before it started,
    give or take messages still in flight, exactly as with stock ZEO; an idle
    client hears of at most one foreign commit after each of its own transactions,
    and a reader woken for its room starts its next transaction without a round trip.

Reconnection
    A new server-side connection knows nothing of what the client cached over an
    earlier one, so `FanoutClientStorage` empties its ZEO cache (keeping its last
    tid) when it opts in; ZEO's reconnection already invalidates every ZODB
    connection cache, so every object is loaded again, and recorded, from then on.

Opting in
    The server advertises ``chatzeo_fanout`` in ``get_info``; a `FanoutClientStorage`
    opts in with ``chatzeo_filter`` as it connects. Any other client (a stock
    ``ClientStorage``, zodburi's ``zeo://``) is never filtered and never sent a
    notice: it gets every commit, as from stock ZEO.

Threads
    Server: everything runs in ZEO's asyncio loop thread; an ``invalidate`` coming
    from another thread (a storage fanning out a ZEO client of its own) is moved
    there, so `WatchIndex` needs no lock. Client: ``notify_connected``,
    ``notify_disconnected`` and ``info`` run on ZEO's IO thread and only set
    attributes; ``lastTransaction`` runs in the thread starting a transaction and
    makes its round trip from there (never from the IO thread).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from ZEO.asyncio.server import Delay
from ZODB.utils import p64, u64

from ..errors import ProtocolViolation
from ..zeoclient import MAX_PUSHED_BYTES, MAX_WANTED, NOTICE, PROTOCOL, PUSH

__all__ = [
    "FanoutMixin",
    "WatchIndex",
    "Fanout",
    "install_fanout",
    "MAX_WATCHED",
]

log = logging.getLogger(__name__)

# Beyond this many distinct oids a connection is sent every commit (stock ZEO).
MAX_WATCHED = 100_000

_METHODS = frozenset({"chatzeo_filter", "chatzeo_sync", "chatzeo_want"})


class WatchIndex:
    """What each connection of one storage watches, and which connections are current.

    ``watchers`` maps an oid to the filtered connections that hold it; ``watching``
    is the inverse, kept to forget a connection that leaves. ``everything`` holds
    the connections sent every commit: not opted in, or past `MAX_WATCHED`.
    """

    def __init__(self, max_watched: int = MAX_WATCHED) -> None:
        self.max_watched = max_watched
        self.watchers: dict[bytes, set[Any]] = {}
        self.watching: dict[Any, set[bytes]] = {}
        self.everything: set[Any] = set()
        self.current: set[Any] = set()
        self.members: set[Any] = set()
        # oid sets whose new states a connection wants pushed (chatzeo_want).
        self.wanted: dict[Any, frozenset[bytes]] = {}

    def filtered(self, zs: Any) -> bool:
        """Whether ``zs`` is sent only what it watches (opted in, within the limit)."""
        return zs in self.watching and zs not in self.everything

    def join(self, zs: Any) -> None:
        """A new connection: sent everything until it opts in."""
        self.members.add(zs)
        self.everything.add(zs)
        self.watching[zs] = set()

    def opt_in(self, zs: Any) -> None:
        """The connection understands notices; it has heard of every commit so far."""
        if zs not in self.watching:
            return  # over the limit already: it stays in ``everything``
        self.everything.discard(zs)
        self.current.add(zs)

    def watch(self, zs: Any, oids: Iterable[bytes]) -> None:
        """``zs`` now holds ``oids`` (it loaded or stored them)."""
        mine = self.watching.get(zs)
        if mine is None:
            return  # left, or past the limit
        for oid in oids:
            if oid not in mine:
                mine.add(oid)
                self.watchers.setdefault(oid, set()).add(zs)
        if len(mine) > self.max_watched:
            log.info("%s watches over %d objects: sent every commit from now on",
                     getattr(zs, "log_label", zs), self.max_watched)
            self._forget_oids(zs)
            self.current.discard(zs)
            self.everything.add(zs)

    def leave(self, zs: Any) -> None:
        self._forget_oids(zs)
        self.members.discard(zs)
        self.wanted.pop(zs, None)
        self.everything.discard(zs)
        self.current.discard(zs)

    def _forget_oids(self, zs: Any) -> None:
        for oid in self.watching.pop(zs, ()):
            holders = self.watchers.get(oid)
            if holders is not None:
                holders.discard(zs)
                if not holders:
                    del self.watchers[oid]


class Fanout:
    """The replacement for `StorageServer.invalidate`, with its per-storage indexes."""

    # Off only in the test that shows why it is on (see FanoutMixin.loadBefore).
    name_old_revisions = True

    def __init__(self, server: Any, max_watched: int = MAX_WATCHED) -> None:
        self.server = server
        self.max_watched = max_watched
        self.indexes: dict[str, WatchIndex] = {}
        # Counters for benchmarks and tests (server_status shows them).
        self.commits = 0
        self.invalidations = 0
        self.oids_sent = 0
        self.notices = 0
        self.stale_loads = 0
        self.pushed = 0

    def index(self, storage_id: str) -> WatchIndex:
        index = self.indexes.get(storage_id)
        if index is None:
            index = self.indexes[storage_id] = WatchIndex(self.max_watched)
        return index

    def invalidate(
        self, zeo_storage: Any, storage_id: str, tid: bytes, invalidated: Iterable[bytes]
    ) -> None:
        """See `StorageServer.invalidate`: keep the invalidation queue (clients that
        reconnect catch up from it), then tell only the connections concerned."""
        loop = _server_loop(self.server)
        if loop is not None and _running_loop() is not loop:
            oids = list(invalidated)
            loop.call_soon_threadsafe(self.invalidate, zeo_storage, storage_id, tid, oids)
            return
        oids = list(invalidated)
        server = self.server
        invq = server.invq[storage_id]
        if len(invq) >= server.invq_bound:
            invq.pop()
        invq.insert(0, (tid, oids))
        self.commits += 1

        index = self.index(storage_id)
        committer = zeo_storage
        plain: list[tuple[Any, list[bytes]]] = []
        connections = server.zeo_storages_by_storage_id.get(storage_id, ())
        if len(connections) != len(index.members):
            # A handler without FanoutMixin (created before install_fanout, or by a
            # create_client_handler set after it) is told everything, as by stock ZEO.
            plain += [(zs, oids) for zs in connections
                      if zs not in index.members and zs is not committer]
        if committer is not None:
            index.watch(committer, oids)
        targets: dict[Any, list[bytes]] = {}
        for oid in oids:
            for zs in index.watchers.get(oid, ()):
                if zs is not committer and zs not in index.everything:
                    targets.setdefault(zs, []).append(oid)
        plain += [(zs, oids) for zs in index.everything if zs is not committer]
        pushes: list[tuple[Any, list[bytes], list[bytes]]] = []
        for zs, theirs in targets.items():
            wanted = index.wanted.get(zs)
            pushed = [oid for oid in theirs if oid in wanted] if wanted else []
            if pushed:
                pushes.append((zs, theirs, pushed))
            else:
                plain.append((zs, theirs))
        noticed = [zs for zs in index.current if zs is not committer and zs not in targets]
        current = set(targets)
        if committer is not None and index.filtered(committer):
            current.add(committer)
        index.current = current
        # Sent once this loop step is over, as stock ZEO does: the storage calls us
        # before it has finished the commit (FileStorage makes it durable after), so
        # nobody must hear of it, or load the state pushed, any earlier. Replies whose
        # meaning depends on these messages having gone first (chatzeo_sync, a load
        # of an old revision) are scheduled the same way, so they follow in order.
        _soon(self.server, self._send, storage_id, tid, plain, pushes, noticed)

    def _send(
        self,
        storage_id: str,
        tid: bytes,
        plain: list[tuple[Any, list[bytes]]],
        pushes: list[tuple[Any, list[bytes], list[bytes]]],
        noticed: list[Any],
    ) -> None:
        for zs, oids in plain:
            if zs.connected:
                zs.async_("invalidateTransaction", tid, oids)
                self.invalidations += 1
                self.oids_sent += len(oids)
        states: dict[bytes, bytes | None] = {}
        storage = self.server.storages[storage_id]
        for zs, oids, pushed in pushes:
            if not zs.connected:
                continue
            carried = []
            for oid in pushed:
                if oid not in states:
                    states[oid] = _state_at(storage, oid, tid)
                data = states[oid]
                if data is not None:
                    carried.append((oid, data))
            if carried:
                zs.async_("info", {PUSH: (tid, oids, carried)})
                self.pushed += len(carried)
            else:
                zs.async_("invalidateTransaction", tid, oids)
            self.invalidations += 1
            self.oids_sent += len(oids)
        for zs in noticed:
            if zs.connected:
                zs.async_("info", {NOTICE: tid})
                self.notices += 1

    def status(self) -> dict[str, int]:
        return {
            "fanout_commits": self.commits,
            "fanout_invalidations": self.invalidations,
            "fanout_oids_sent": self.oids_sent,
            "fanout_notices": self.notices,
            "fanout_stale_loads": self.stale_loads,
            "fanout_pushed_states": self.pushed,
            "fanout_watched_oids": sum(len(i.watchers) for i in self.indexes.values()),
        }


class FanoutMixin:
    """Records what a ZEO client connection loads and stores, for `Fanout`.

    A cooperative mixin for `ZEO.StorageServer.ZEOStorage` and any subclass of it
    (``class Handler(FanoutMixin, GuardedZEOStorage)``); every method calls
    ``super()``. Without a `Fanout` installed on the server it changes nothing.
    """

    # Provided by ZEOStorage; declared for mypy.
    server: Any
    storage_id: Any
    storage: Any
    connection: Any
    connected: Any

    def _fanout_index(self) -> WatchIndex | None:
        fanout: Fanout | None = getattr(self.server, "chatzeo_fanout", None)
        if fanout is None or self.storage_id is None:
            return None
        return fanout.index(self.storage_id)

    def register(self, storage_id: str, read_only: bool) -> Any:
        result = super().register(storage_id, read_only)  # type: ignore[misc]
        index = self._fanout_index()
        if index is not None:
            index.join(self)
        return result

    def check_call(self, name: str, args: tuple[Any, ...]) -> None:
        """The protocol gate's rule for this module's calls (`chatzeo.server.protocol`):
        anyone may make them; ``chatzeo_want`` takes one list, which it checks itself
        (bounded, nonsense ignored), the others none. Other calls: as before."""
        if name in _METHODS:
            expected = 1 if name == "chatzeo_want" else 0
            if len(args) != expected:
                raise ProtocolViolation(f"{name} takes {expected} arguments, not {len(args)}")
            return
        check = getattr(super(), "check_call", None)
        if check is not None:
            check(name, args)

    def setup_delegation(self) -> None:
        super().setup_delegation()  # type: ignore[misc]
        if getattr(self.server, "chatzeo_fanout", None) is not None:
            self.connection.methods = frozenset(self.connection.methods) | _METHODS

    def get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super().get_info()  # type: ignore[misc]
        if getattr(self.server, "chatzeo_fanout", None) is not None:
            info["chatzeo_fanout"] = PROTOCOL
        return info

    def loadBefore(self, oid: bytes, tid: bytes) -> Any:  # noqa: N802 (ZEO's name)
        result = super().loadBefore(oid, tid)  # type: ignore[misc]
        index = self._fanout_index()
        if index is None:
            return result
        index.watch(self, (oid,))
        fanout: Fanout = self.server.chatzeo_fanout
        if (
            (result is None or result[2] is not None)
            and index.filtered(self)
            and fanout.name_old_revisions
        ):
            # A revision that is no longer current (or none yet): the commit that
            # replaced it was not sent here, as nobody here held the object then.
            # Stock ZEO would have sent it; name the oid now, at the last tid (every
            # other invalidation up to it is sent already or queued before this), and
            # only then reply, so every ZODB connection of the client drops this
            # revision at its next transaction, which starts after that tid.
            last = self.storage.lastTransaction()
            index.current.add(self)
            fanout.stale_loads += 1
            delay = Delay()

            def name_then_reply() -> None:
                if self.connected:
                    self.async_("invalidateTransaction", last, [oid])  # type: ignore[attr-defined]
                delay.reply(result)

            _soon(self.server, name_then_reply)
            return delay
        return result

    def chatzeo_filter(self) -> None:
        """The client asks to be sent only what it watches, and notices."""
        index = self._fanout_index()
        if index is not None:
            index.opt_in(self)

    def chatzeo_sync(self) -> Any:
        """The storage's last tid; every invalidation up to it was written before
        this reply. The connection is current again."""
        index = self._fanout_index()
        if index is not None and index.filtered(self):
            index.current.add(self)
        tid: bytes = self.storage.lastTransaction()
        delay = Delay()
        # After the invalidations already queued (see Fanout.invalidate).
        _soon(self.server, delay.reply, tid)
        return delay

    def chatzeo_want(self, oids: Any) -> None:
        """Push the new states of these oids (at most `MAX_WANTED`) with their
        invalidations, instead of waiting for this client to load them."""
        index = self._fanout_index()
        if index is None or not isinstance(oids, (list, tuple)):
            return
        valid = [oid for oid in oids[:MAX_WANTED] if isinstance(oid, bytes) and len(oid) == 8]
        if valid:
            index.wanted[self] = frozenset(valid)
        else:
            index.wanted.pop(self, None)

    def server_status(self) -> dict[str, Any]:
        status: dict[str, Any] = super().server_status()  # type: ignore[misc]
        fanout: Fanout | None = getattr(self.server, "chatzeo_fanout", None)
        if fanout is not None:
            status.update(fanout.status())
        return status

    def notify_disconnected(self) -> None:
        index = self._fanout_index()
        try:
            super().notify_disconnected()  # type: ignore[misc]
        finally:
            if index is not None:
                index.leave(self)


_composed: dict[type, type] = {}


def _with_mixin(cls: type) -> type:
    if issubclass(cls, FanoutMixin):
        return cls
    composed = _composed.get(cls)
    if composed is None:
        composed = _composed[cls] = type(f"Fanout{cls.__name__}", (FanoutMixin, cls), {})
    return composed


def install_fanout(server: Any, max_watched: int = MAX_WATCHED) -> Fanout:
    """Replace ``server``'s (ZEO's `StorageServer`) broadcast with `Fanout`, and make
    every connection handler it creates from now on a `FanoutMixin` on top of the
    handler class it would have made (`ZEOStorage`, a guard's, ...). Call after any
    other change to ``create_client_handler``, before the server loops."""
    fanout = Fanout(server, max_watched)
    server.chatzeo_fanout = fanout
    server.invalidate = fanout.invalidate
    create = server.create_client_handler

    def create_client_handler() -> Any:
        handler = create()
        # The handler is fresh (no method has run yet), so giving it the composed
        # class of the same layout is safe; it works for whatever class `create`
        # chose, without knowing its constructor.
        handler.__class__ = _with_mixin(type(handler))
        return handler

    server.create_client_handler = create_client_handler
    log.info("commits are sent only to the connections that hold what they change")
    return fanout


def _soon(server: Any, callback: Any, *args: Any) -> None:
    """Run ``callback`` after this step of the server's loop (at once without one)."""
    loop = _server_loop(server)
    if loop is None:
        callback(*args)
    else:
        loop.call_soon(callback, *args)


def _state_at(storage: Any, oid: bytes, tid: bytes) -> bytes | None:
    """The state ``oid`` got in transaction ``tid``, if small enough to push."""
    try:
        found = storage.loadBefore(oid, p64(u64(tid) + 1))
    except Exception:
        return None
    if found is None:
        return None
    data, start, _end = found
    if start != tid or data is None or len(data) > MAX_PUSHED_BYTES:
        return None
    state: bytes = data
    return state


def _server_loop(server: Any) -> asyncio.AbstractEventLoop | None:
    acceptor = getattr(server, "acceptor", None)
    loop = getattr(acceptor, "event_loop", None)
    return loop if isinstance(loop, asyncio.AbstractEventLoop) else None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
