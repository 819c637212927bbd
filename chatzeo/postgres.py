"""Everything chatzeo knows of PostgreSQL (RelStorage): opening, detecting, lost
connections, and LISTEN/NOTIFY, the commit push that RelStorage does not have.

Opening
    `open_uri` opens a ``postgres://`` URI through zodburi: history-free unless the
    URI says ``keep_history=`` (docs/scaling.md says why), waiting up to ``wait``
    seconds for a PostgreSQL that is restarting, as a ZEO client waits for its
    server. `is_relstorage` is the one test of whether a storage is RelStorage, and
    `lost_database` whether an error means its database connection was lost.

Push

RelStorage learns of other clients' commits only when a transaction starts (it polls
the database then), so by itself a reader would have to start transactions on a
timer. Instead `install_trigger` (run by ``chatzeo init-db``) puts a trigger on
RelStorage's history-free ``object_state`` table that calls
``pg_notify('chatzeo_<zoid>', '')`` for each object a transaction writes: a channel
per object, so PostgreSQL hands a listener only the notifications of the objects it
listens to (a reader: its room's clock), never the rest of the database's commits.
PostgreSQL delivers notifications only when (and if) the writing transaction
commits, folds identical ones within a transaction, and never delivers those of an
aborted one. Databases prepared before this trigger (one channel ``chatzeo`` with
the zoid as payload) still work: their listener hears everything and keeps what it
listens to, until ``chatzeo init-db`` is run again.

A `Listener` holds one extra connection; `shared_listener` gives every feed of a
process the same one for a database, and each subscribes (`Listener.subscribe`) to
the oids it watches, with its own callback. A callback only learns *that* an object
changed; the reader then starts a new transaction, RelStorage polls, and the reader
sees the new state (the notification was sent after the commit, so any snapshot
taken after it includes that commit).

Threads
    `Listener` runs its own daemon thread: it waits with ``select()`` on the
    connection's socket (and on a pipe that `subscribe` and `close` write to), runs
    the LISTEN and UNLISTEN statements subscriptions need, consumes notifications
    and calls ``callback(oids)`` there, or ``callback(None)`` after it had to
    reconnect (notifications sent meanwhile are lost, so anything may have
    changed). Callbacks must be quick and thread-safe. The connection belongs to
    that thread alone; `subscribe` waits until the thread has run its statements.
    `install_trigger` and `trigger_installed` run in the caller's thread on a
    connection of their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ZODB.utils import p64, u64

from .errors import DatabaseNotPrepared, InvalidTarget, ServerUnavailable

__all__ = [
    "open_uri",
    "is_relstorage",
    "lost_database",
    "CHANNEL",
    "Listener",
    "channel_of",
    "dsn_of",
    "install_trigger",
    "release_listener",
    "shared_listener",
    "trigger_installed",
]

log = logging.getLogger(__name__)

CHANNEL = "chatzeo"  # the prefix of every channel, and the old single channel
TRIGGER = "chatzeo_notify_each"
_OLD_TRIGGER = "chatzeo_notify"

# One notification per written row, on that object's own channel: LISTEN then
# filters in PostgreSQL, and a listener is sent only what it watches. Rows a pack
# deletes change nothing a reader can see, so DELETE is not watched.
_INSTALL = f"""
CREATE OR REPLACE FUNCTION {TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}_' || NEW.zoid::text, '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS {TRIGGER} ON object_state;
CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE ON object_state
    FOR EACH ROW EXECUTE FUNCTION {TRIGGER}();
DROP TRIGGER IF EXISTS {_OLD_TRIGGER} ON object_state;
DROP FUNCTION IF EXISTS {_OLD_TRIGGER}();
"""

_INSTALLED = "SELECT 1 FROM pg_trigger WHERE tgname = %s AND tgrelid = 'object_state'::regclass"
_HISTORY_FREE = (
    "SELECT 1 FROM information_schema.columns"
    " WHERE table_name = 'object_state' AND column_name = 'state_size'"
    " AND table_schema = current_schema()"
    " AND NOT EXISTS (SELECT 1 FROM information_schema.tables"
    "  WHERE table_name = 'current_object' AND table_schema = current_schema())"
)

Callback = Callable[[frozenset[bytes] | None], None]


# -- opening -------------------------------------------------------------------------


def open_uri(uri: str, wait: float) -> tuple[Any, dict[str, Any]]:
    """A RelStorage storage for a ``postgres://`` ``uri``, and the DB options the URI
    gives. Raises `InvalidTarget` (no RelStorage installed, no such database, failed
    authentication, a malformed URI) or `ServerUnavailable` after ``wait`` seconds
    without an answer."""
    import zodburi

    if "keep_history=" not in uri:
        uri += ("&" if "?" in uri else "?") + "keep_history=false"
    try:
        factory, options = zodburi.resolve_uri(uri)
    except Exception as error:
        if not _has_relstorage():
            reason = "PostgreSQL needs RelStorage: pip install 'chatzeo[pg]'"
            raise InvalidTarget(uri, reason) from None
        raise InvalidTarget(uri, _one_line(error)) from None
    import psycopg2

    deadline = time.monotonic() + wait
    while True:
        try:
            return factory(), options
        except psycopg2.OperationalError as error:
            reason = _one_line(error)
            if "does not exist" in reason or "authentication" in reason:
                raise InvalidTarget(uri, reason) from None
            if time.monotonic() >= deadline:
                raise ServerUnavailable(uri, wait) from None
            time.sleep(0.1)


def is_relstorage(storage: Any) -> bool:
    """Whether ``storage`` is a RelStorage (of any database)."""
    return getattr(storage, "_adapter", None) is not None


def lost_database(storage: Any, error: BaseException) -> bool:
    """Whether ``error`` is RelStorage's report of a lost database server: its
    driver's error (psycopg2's OperationalError), where ZEO raises the
    `TransientError` ClientDisconnected. Both mean the same thing, and a retry
    reconnects."""
    if not is_relstorage(storage):
        return False
    lost = getattr(storage._adapter.driver, "disconnected_exceptions", ())
    return bool(lost) and isinstance(error, lost)


def _has_relstorage() -> bool:
    try:
        import relstorage  # noqa: F401
    except ImportError:
        return False
    return True


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# -- push ----------------------------------------------------------------------------


def dsn_of(storage: Any) -> str | None:
    """The libpq DSN of ``storage`` if it is a RelStorage on PostgreSQL, else None."""
    if not is_relstorage(storage):
        return None
    adapter = storage._adapter
    if type(adapter).__name__ != "PostgreSQLAdapter":
        return None
    dsn = getattr(adapter, "_dsn", None)
    return dsn if isinstance(dsn, str) else None


def channel_of(oid: bytes) -> str:
    """The NOTIFY channel of one object."""
    return f"{CHANNEL}_{u64(oid)}"


def _connect(dsn: str, application_name: str | None = None) -> Any:
    import psycopg2  # only needed with the 'pg' extra

    if application_name is None:
        connection = psycopg2.connect(dsn)
    else:
        connection = psycopg2.connect(dsn, application_name=application_name)
    connection.autocommit = True
    return connection


def install_trigger(dsn: str) -> None:
    """Create (or replace) the NOTIFY trigger on ``object_state``, in one transaction.

    Raises `DatabaseNotPrepared` if the database has no history-free RelStorage
    schema (chatzeo's trigger is written for that table layout).
    """
    connection = _connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(_HISTORY_FREE)
            if cursor.fetchone() is None:
                raise DatabaseNotPrepared(
                    "no history-free RelStorage schema (open it with keep_history=false)"
                )
            connection.autocommit = False
            cursor.execute(_INSTALL)
            connection.commit()
    finally:
        connection.close()


def trigger_installed(dsn: str) -> bool:
    """Whether ``chatzeo init-db`` installed a NOTIFY trigger in this database."""
    return _trigger_kind(dsn) is not None


def _trigger_kind(dsn: str) -> str | None:
    """"each" (a channel per object), "single" (the old one channel), or None."""
    connection = _connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass('object_state')")
            row = cursor.fetchone()
            if row is None or row[0] is None:
                return None
            for name, kind in ((TRIGGER, "each"), (_OLD_TRIGGER, "single")):
                cursor.execute(_INSTALLED, (name,))
                if cursor.fetchone() is not None:
                    return kind
            return None
    finally:
        connection.close()


class Listener:
    """One LISTEN connection serving any number of subscribers (see the module
    docstring). ``callback``, if given, is a first subscriber with no oids yet.
    Raises `DatabaseNotPrepared` at once if the database lacks the trigger, since
    no notification would ever come."""

    def __init__(
        self, dsn: str, callback: Callback | None = None, *, retry_delay: float = 0.5
    ) -> None:
        self._dsn = dsn
        self._retry_delay = retry_delay
        self._lock = threading.Lock()
        self._subscribers: dict[Any, tuple[frozenset[bytes], Callback]] = {}
        if callback is not None:
            self._subscribers[self] = (frozenset(), callback)
        self._requests: list[threading.Event] = []
        self._listening: set[str] = set()
        # Notifications this connection received for channels nobody here listens
        # to: always 0 with the per-object trigger (PostgreSQL filters), for tests.
        self.foreign = 0
        self._wake_read, self._wake_write = os.pipe()
        self._closed = threading.Event()
        self._users = 0
        try:
            kind = _trigger_kind(dsn)
            if kind is None:
                raise DatabaseNotPrepared(
                    "the database has no chatzeo NOTIFY trigger: run 'chatzeo init-db' on it"
                )
            self._single = kind == "single"
            connection = self._listen()
        except BaseException:
            self._close_pipe()
            raise
        self._thread = threading.Thread(
            target=self._run, args=(connection,), name="chatzeo-pg-listener", daemon=True
        )
        self._thread.start()

    def subscribe(
        self, key: Any, oids: frozenset[bytes], callback: Callback | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Hear of commits to exactly ``oids`` from now on (no oids: unsubscribe),
        through ``callback`` (or the one given before for ``key``). Returns once the
        connection listens, so a commit after this returns is always heard."""
        with self._lock:
            if oids:
                known = self._subscribers.get(key)
                chosen = callback or (known[1] if known else None)
                if chosen is None:
                    raise ValueError("a new subscriber needs a callback")
                self._subscribers[key] = (frozenset(oids), chosen)
            else:
                self._subscribers.pop(key, None)
            done = threading.Event()
            self._requests.append(done)
        self._poke()
        done.wait(timeout)

    def close(self) -> None:
        """Stop the thread and close its connection; waits for the thread to end."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._poke()
        self._thread.join(10)
        self._close_pipe()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # closed already
            os.write(self._wake_write, b"x")

    # -- the listener thread ---------------------------------------------------

    def _channels(self) -> set[str]:
        with self._lock:
            return {channel_of(oid) for oids, _ in self._subscribers.values() for oid in oids}

    def _listen(self) -> Any:
        connection = _connect(self._dsn, application_name="chatzeo-listener")
        self._listening = set()
        if self._single:
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
        else:
            self._apply(connection)
        return connection

    def _apply(self, connection: Any) -> None:
        """LISTEN and UNLISTEN so that the connection hears exactly the channels
        the subscribers need, then tell the waiting subscribers."""
        with self._lock:
            waiting, self._requests = self._requests, []
        if not self._single:
            wanted = self._channels()
            with connection.cursor() as cursor:
                for channel in sorted(wanted - self._listening):
                    cursor.execute(f"LISTEN {channel}")  # a name of digits we made
                for channel in sorted(self._listening - wanted):
                    cursor.execute(f"UNLISTEN {channel}")
            self._listening = wanted
        for done in waiting:
            done.set()

    def _run(self, connection: Any) -> None:
        while not self._closed.is_set():
            try:
                self._consume(connection)
            except Exception as error:  # the server went away: reconnect below
                log.info("lost the PostgreSQL listener connection: %s", error)
            connection.close()
            connection = self._reconnect()
            if connection is None:
                break
            # Notifications sent while we were away are gone: report "anything".
            with self._lock:
                callbacks = [callback for _, callback in self._subscribers.values()]
            for callback in callbacks:
                callback(None)
        else:
            connection.close()
        with self._lock:
            waiting, self._requests = self._requests, []
        for done in waiting:
            done.set()

    def _consume(self, connection: Any) -> None:
        while not self._closed.is_set():
            with self._lock:
                pending = bool(self._requests)
            if pending:
                self._apply(connection)
            ready, _, _ = select.select([connection, self._wake_read], [], [])
            if self._wake_read in ready:
                os.read(self._wake_read, 4096)
                continue
            connection.poll()
            if connection.notifies:
                notifies, connection.notifies[:] = list(connection.notifies), []
                self._dispatch(notifies)

    def _dispatch(self, notifies: list[Any]) -> None:
        if self._single:
            changed = _oids(n.payload for n in notifies)
        else:
            changed = frozenset(
                p64(int(n.channel[len(CHANNEL) + 1:])) for n in notifies
                if n.channel.startswith(CHANNEL + "_")
            )
        with self._lock:
            subscribers = list(self._subscribers.values())
        heard: set[bytes] = set()
        for oids, callback in subscribers:
            mine = changed & oids if oids else changed
            heard |= mine
            if mine or not oids:
                callback(frozenset(mine) if oids else changed)
        self.foreign += len(changed - heard) if all(o for o, _ in subscribers) else 0

    def _reconnect(self) -> Any:
        while not self._closed.wait(self._retry_delay):
            try:
                return self._listen()
            except Exception as error:
                log.info("PostgreSQL listener cannot reconnect yet: %s", error)
        return None

    def _close_pipe(self) -> None:
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)


# One listener connection per process and database, shared by every feed: a
# process-wide registry is the point (see the module docstring), guarded by a lock.
_SHARED: dict[str, Listener] = {}
_SHARED_LOCK = threading.Lock()


def shared_listener(dsn: str) -> Listener:
    """This process's `Listener` for ``dsn``, started on first use; give it back
    with `release_listener`."""
    with _SHARED_LOCK:
        listener = _SHARED.get(dsn)
        if listener is None or listener._closed.is_set():
            listener = _SHARED[dsn] = Listener(dsn)
        listener._users += 1
        return listener


def release_listener(listener: Listener) -> None:
    """One user fewer; the last one closes the connection."""
    with _SHARED_LOCK:
        listener._users -= 1
        if listener._users > 0:
            return
        if _SHARED.get(listener._dsn) is listener:
            del _SHARED[listener._dsn]
    listener.close()


def _oids(payloads: Iterable[str]) -> frozenset[bytes]:
    return frozenset(p64(int(payload)) for payload in payloads)
