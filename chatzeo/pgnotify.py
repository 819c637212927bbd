"""PostgreSQL LISTEN/NOTIFY: the commit push that RelStorage does not have.

RelStorage learns of other clients' commits only when a transaction starts (it polls
the database then), so by itself a reader would have to start transactions on a
timer. Instead `install_trigger` (run by ``chatzeo init-db``) puts a trigger on
RelStorage's history-free ``object_state`` table that calls
``pg_notify('chatzeo', zoid)`` for each object a transaction writes. PostgreSQL
delivers notifications only when (and if) the writing transaction commits, folds
identical ones within a transaction, and never delivers those of an aborted one.

A `Listener` holds one extra connection that has run ``LISTEN chatzeo`` and hands
the oids of each batch of notifications to a callback. The callback only learns
*that* an object changed; the reader then starts a new transaction, RelStorage polls,
and the reader sees the new state (the notification was sent after the commit, so
any snapshot taken after it includes that commit).

Threads
    `Listener` runs its own daemon thread: it waits with ``select()`` on the
    connection's socket (and on a pipe that `Listener.close` writes to), consumes the
    notifications and calls ``callback(oids)`` there, or ``callback(None)`` after it
    had to reconnect (notifications sent meanwhile are lost, so anything may have
    changed). The callback must be quick and thread-safe. The listener's connection
    belongs to that thread alone. `install_trigger` and `trigger_installed` run in
    the caller's thread on a connection of their own.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ZODB.utils import p64

from .errors import DatabaseNotPrepared

__all__ = [
    "CHANNEL",
    "Listener",
    "dsn_of",
    "install_trigger",
    "trigger_installed",
]

log = logging.getLogger(__name__)

CHANNEL = "chatzeo"
TRIGGER = "chatzeo_notify"

# One notification per written row, carrying its zoid: a reader then wakes only
# for the objects it watches, as it does under ZEO. Rows a pack deletes change
# nothing a reader can see, so DELETE is not watched.
_INSTALL = f"""
CREATE OR REPLACE FUNCTION {TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', NEW.zoid::text);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS {TRIGGER} ON object_state;
CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE ON object_state
    FOR EACH ROW EXECUTE FUNCTION {TRIGGER}();
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


def dsn_of(storage: Any) -> str | None:
    """The libpq DSN of ``storage`` if it is a RelStorage on PostgreSQL, else None."""
    adapter = getattr(storage, "_adapter", None)
    if adapter is None or type(adapter).__name__ != "PostgreSQLAdapter":
        return None
    dsn = getattr(adapter, "_dsn", None)
    return dsn if isinstance(dsn, str) else None


def _connect(dsn: str) -> Any:
    import psycopg2  # only needed with the 'pg' extra

    connection = psycopg2.connect(dsn)
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
    """Whether ``chatzeo init-db`` installed the NOTIFY trigger in this database."""
    connection = _connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass('object_state')")
            row = cursor.fetchone()
            if row is None or row[0] is None:
                return False
            cursor.execute(_INSTALLED, (TRIGGER,))
            return cursor.fetchone() is not None
    finally:
        connection.close()


class Listener:
    """Calls ``callback(oids)`` from its own thread whenever committed transactions
    wrote objects (see the module docstring). Raises `DatabaseNotPrepared` at once
    if the database lacks the trigger, since no notification would ever come."""

    def __init__(self, dsn: str, callback: Callback, *, retry_delay: float = 0.5) -> None:
        self._dsn = dsn
        self._callback = callback
        self._retry_delay = retry_delay
        self._wake_read, self._wake_write = os.pipe()
        self._closed = threading.Event()
        try:
            if not trigger_installed(dsn):
                raise DatabaseNotPrepared(
                    "the database has no chatzeo NOTIFY trigger: run 'chatzeo init-db' on it"
                )
            connection = self._listen()
        except BaseException:
            self._close_pipe()
            raise
        self._thread = threading.Thread(
            target=self._run, args=(connection,), name="chatzeo-pg-listener", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and close its connection; waits for the thread to end."""
        if self._closed.is_set():
            return
        self._closed.set()
        os.write(self._wake_write, b"x")
        self._thread.join(10)
        self._close_pipe()

    # -- the listener thread ---------------------------------------------------

    def _listen(self) -> Any:
        connection = _connect(self._dsn)
        with connection.cursor() as cursor:
            cursor.execute(f"LISTEN {CHANNEL}")
        return connection

    def _run(self, connection: Any) -> None:
        while not self._closed.is_set():
            try:
                self._consume(connection)
            except Exception as error:  # the server went away: reconnect below
                log.info("lost the PostgreSQL listener connection: %s", error)
            connection.close()
            connection = self._reconnect()
            if connection is None:
                return
            # Notifications sent while we were away are gone: report "anything".
            self._callback(None)
        connection.close()

    def _consume(self, connection: Any) -> None:
        while not self._closed.is_set():
            ready, _, _ = select.select([connection, self._wake_read], [], [])
            if self._wake_read in ready:
                return
            connection.poll()
            if connection.notifies:
                oids = _oids(n.payload for n in connection.notifies)
                connection.notifies.clear()
                self._callback(oids)

    def _reconnect(self) -> Any:
        while not self._closed.wait(self._retry_delay):
            try:
                return self._listen()
            except Exception as error:
                log.info("PostgreSQL listener cannot reconnect yet: %s", error)
        return None

    def _close_pipe(self) -> None:
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass


def _oids(payloads: Iterable[str]) -> frozenset[bytes]:
    return frozenset(p64(int(payload)) for payload in payloads)
