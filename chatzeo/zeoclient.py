"""The ZEO client storage every chatzeo database opens over ZEO (`chatzeo.database`).

`ChatClientStorage` is ZEO's ``ClientStorage`` with three additions:

* watched fan-out (`FanoutClientStorage`; the server side and the whole protocol
  are described in `chatzeo.server.fanout`): it opts in as it connects, remembers
  the newest "you missed commits" notice, catches up with one round trip when a
  transaction starts behind it, and stores pushed states in its cache;
* oids fetched in advance are forgotten on disconnect, and a vote waits a bounded
  time for the commit lock (`CommitLockTimeout`);
* the server's refusals arrive as chatzeo's own error classes
  (`register_server_errors`), and `RefusalCatcher` reads why a registration was
  refused from ZEO's client log.

Threads: ``notify_connected``, ``notify_disconnected`` and ``info`` run on ZEO's IO
thread and only set attributes; ``lastTransaction`` and votes run in the thread of
the transaction, never on the IO thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Iterable
from typing import Any

from ZEO.asyncio.client import exc_factories
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ClientDisconnected
from ZODB.utils import z64

from .errors import CommitLockTimeout, ProtocolViolation, TooManyConnections, TrustViolation
from .retry import commit_deadline

__all__ = [
    "ChatClientStorage",
    "FanoutClientStorage",
    "RefusalCatcher",
    "register_server_errors",
    "PROTOCOL",
    "NOTICE",
    "PUSH",
    "MAX_WANTED",
    "MAX_PUSHED_BYTES",
]

# The version of the fan-out protocol, advertised in get_info and sent back by clients.
PROTOCOL = 1
# The key of the "you missed commits" notice inside an ``info`` message.
NOTICE = "chatzeo_behind"
# The key of a pushed commit inside an ``info`` message: (tid, oids, [(oid, state)]).
PUSH = "chatzeo_push"
# At most this many oids pushed per connection, of at most this many bytes each.
MAX_WANTED = 64
MAX_PUSHED_BYTES = 64 * 1024


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class FanoutClientStorage(ClientStorage):
    """ZEO's client, opting in to watched fan-out when the server offers it.

    See the module docstring: it empties its cache as it opts in, remembers the
    newest "you missed commits" notice, and ``lastTransaction`` catches up with one
    round trip when that notice is newer than its last tid.
    """

    _fanout_filtered = False
    _fanout_notice: bytes = z64
    _fanout_wanted: dict[Any, frozenset[bytes]] | None = None
    _fanout_sent_wanted: frozenset[bytes] = frozenset()
    # Round trips made to catch up (for benchmarks and tests).
    fanout_syncs = 0

    def notify_connected(self, conn: Any, info: dict[str, Any]) -> None:
        self._fanout_notice = z64
        self._fanout_filtered = info.get("chatzeo_fanout") == PROTOCOL
        self._fanout_sent_wanted = frozenset()
        if self._fanout_filtered:
            self._forget_cache()
            conn.call_async("chatzeo_filter", ())
            wanted = self._fanout_union()
            if wanted:
                conn.call_async("chatzeo_want", (sorted(wanted),))
                self._fanout_sent_wanted = wanted
        super().notify_connected(conn, info)

    def fanout_want(self, key: Any, oids: Iterable[bytes]) -> None:
        """Ask the server to push the new states of ``oids`` with their invalidations
        (``key`` names the asker, such as a `ChangeFeed`; no oids withdraws). Any
        thread; best effort: without a server, or one that does not push, nothing."""
        if self._fanout_wanted is None:
            self._fanout_wanted = {}
        chosen = frozenset(oids)
        if chosen:
            self._fanout_wanted[key] = chosen
        else:
            self._fanout_wanted.pop(key, None)
        wanted = self._fanout_union()
        if wanted == self._fanout_sent_wanted or not self._fanout_filtered:
            return
        try:
            self._server.async_("chatzeo_want", sorted(wanted))
        except ClientDisconnected:
            return  # sent again as it reconnects
        self._fanout_sent_wanted = wanted

    def _fanout_union(self) -> frozenset[bytes]:
        wanted = self._fanout_wanted or {}
        return frozenset(oid for oids in list(wanted.values()) for oid in oids)

    def _forget_cache(self) -> None:
        # This server-side connection has recorded nothing yet: objects cached over
        # an earlier one would never be invalidated. clear() keeps the last tid.
        self._cache.clear()

    def notify_disconnected(self) -> None:
        self._fanout_filtered = False
        super().notify_disconnected()

    def info(self, values: dict[str, Any]) -> None:
        notice = values.pop(NOTICE, None) if NOTICE in values else None
        if isinstance(notice, bytes) and notice > self._fanout_notice:
            self._fanout_notice = notice
        push = values.pop(PUSH, None) if PUSH in values else None
        if push is not None:
            self._pushed(*push)
        if values:
            super().info(values)

    def _pushed(self, tid: bytes, oids: list[bytes], states: list[tuple[bytes, bytes]]) -> None:
        """An invalidation carrying new states (IO thread). Does what ZEO's client
        does for ``invalidateTransaction``, and stores the states as current from
        ``tid`` before the ZODB connections (and feeds) hear of it, as ZEO does for
        a client's own commit, so the reader woken by it loads them from the cache."""
        cache = self._cache
        for oid in oids:
            cache.invalidate(oid, tid)
        for oid, data in states:
            cache.store(oid, tid, None, data)
        self.invalidateTransaction(tid, oids)
        cache.setLastTid(tid)

    def lastTransaction(self) -> bytes:  # noqa: N802 (ZODB's name)
        tid: bytes = self._cache.getLastTid()
        if (
            self._fanout_filtered
            and self._fanout_notice > tid
            and _running_loop() is not getattr(self._server, "loop", None)  # not ZEO's IO thread
            and self.is_connected()
        ):
            tid = self._catch_up(tid)
        return tid

    def fanout_sync(self) -> bytes | None:
        """Hear of every commit the server has finished, now: one round trip, even
        while current. Returns the last tid, or None (nothing asked) unless the
        server filters this connection's invalidations: from stock ZEO every
        commit's come anyway, and a caller waits for them. Not on ZEO's IO thread."""
        if not (self._fanout_filtered and self.is_connected()):
            return None
        return self._catch_up(self._cache.getLastTid())

    def _catch_up(self, tid: bytes) -> bytes:
        try:
            server_tid = self._server.call("chatzeo_sync")
        except ClientDisconnected:
            return tid  # as stock ZEO does when disconnected: the cache's view
        self.fanout_syncs += 1
        cache = self._cache
        # Invalidations that arrived after the reply may have moved the tid on.
        with cache._lock:
            if isinstance(server_tid, bytes) and server_tid > cache.getLastTid():
                cache.setLastTid(server_tid)
            last: bytes = cache.getLastTid()
        return last


class ChatClientStorage(FanoutClientStorage):
    """ZEO's client (with `chatzeo.server.fanout`'s watched fan-out), forgetting on
    disconnect the oids it fetched in advance, and waiting a bounded time for the
    commit lock.

    ZEO keeps pre-fetched oids across a reconnect, but a server that died never
    recorded them as allocated (FileStorage does at commit), so once restarted it
    hands the same oids to other clients: two new objects would share an oid, and
    the connection that loaded one refuses to store the other ("A different object
    already has the same oid"). ``notify_disconnected`` runs in ZEO's IO thread;
    ``new_oid`` then fetches a fresh batch.

    ZEO's vote waits for the server's commit lock without any bound: while another
    writer holds it (up to the server's ``transaction-timeout``) the committing
    thread would block. Here a vote waits at most ``vote_timeout`` seconds, and no
    longer than the retry budget of the `run_in_transaction` it runs in, then
    raises `CommitLockTimeout`; the transaction manager's abort then withdraws the
    vote on the server (its ``tpc_abort`` drops a waiting vote).
    """

    def __init__(self, *args: Any, vote_timeout: float | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.vote_timeout = vote_timeout
        self._unbounded_call: Any = self._call  # type: ignore[has-type]
        self._call = self._bounded_call

    def _bounded_call(self, method: str, *args: Any, **kw: Any) -> Any:
        if method != "vote" or not self.vote_timeout:
            return self._unbounded_call(method, *args, **kw)
        timeout = self.vote_timeout
        deadline = commit_deadline()
        if deadline is not None:
            # Within the retry budget of the write: its caller gives up then anyway.
            timeout = min(timeout, max(0.1, deadline - time.monotonic()))
        future = self._server.call(method, *args, wait=False)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            # Not cancelled: ZEO's IO thread would then meet a cancelled future when
            # a late reply comes. The abort that follows withdraws the vote.
            raise CommitLockTimeout(round(timeout, 1)) from None

    def notify_disconnected(self) -> None:
        self._oids.clear()
        super().notify_disconnected()


class RefusalCatcher(logging.Handler):
    """Why the server refused this client's registration, if it said: ZEO's client
    only logs it (``Registration or cache validation failed``) and tries again, so
    the caller would see no more than a server that never answered. Listens to
    ZEO's client logger while a connection is opened; if that logger was silent,
    it is made to speak to this handler only."""

    _REASONS = ("this certificate was revoked",)

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reason = ""
        self._logger = logging.getLogger("ZEO.asyncio.client")
        self._saved: tuple[int, bool] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        text = " ".join(str(arg) for arg in (record.args or ()))
        for reason in self._REASONS:
            if reason in text:
                self.reason = reason

    def __enter__(self) -> RefusalCatcher:
        self._logger.addHandler(self)
        if not self._logger.isEnabledFor(logging.ERROR):
            self._saved = (self._logger.level, self._logger.propagate)
            self._logger.setLevel(logging.ERROR)
            self._logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        if self._saved is not None:
            self._logger.setLevel(self._saved[0])
            self._logger.propagate = self._saved[1]


def register_server_errors() -> None:
    """Make ZEO's client raise chatzeo's own classes for the server's refusals
    (`chatzeo.server.guard`, `chatzeo.server.protocol`), which arrive by name. Idempotent; done
    when this module is imported."""
    for refusal in (TrustViolation, ProtocolViolation):
        exc_factories.setdefault(
            f"{refusal.__module__}.{refusal.__name__}",
            lambda _name, args, refusal=refusal: refusal(*args),
        )
    exc_factories.setdefault(
        f"{TooManyConnections.__module__}.{TooManyConnections.__name__}",
        _too_many_connections,
    )


def _too_many_connections(_name: str, args: Any) -> Exception:
    # ZEO sends an exception with attributes as its __dict__.
    if isinstance(args, dict) and isinstance(args.get("user"), str) and type(
        args.get("limit")
    ) is int:
        return TooManyConnections(args["user"], args["limit"])
    return ProtocolViolation(f"too many connections: {args!r}"[:200])


register_server_errors()
