"""Events after commit: tell the posting process about a message once it is committed.

`ChatSession.post` (and each attempt of `add_message`) registers an after-commit hook
on the transaction that holds the message. Once that transaction has committed, each
subscriber of `subscribers` is called with a `MessagePosted`, and so is
``zope.event.notify`` when `zope.event` is installed (a Pyramid, Zope or Plone app
subscribes there with its usual tools). Nothing is called for a transaction that
aborts or whose commit fails, nor for a message posted after a savepoint that was rolled
back. Other processes learn of messages through
`chatzeo.watch` instead.

Threads
    Subscribers run in the thread that committed, inside ``commit()``, after the
    commit is final and before ``commit()`` returns: keep them short, and do not use
    the committing connection from them (its transaction is over). Their errors are
    logged and swallowed, so one bad subscriber can neither undo a commit nor stop the
    others. `Subscribers` itself may be changed from any thread.

Only posts made while someone listens (a subscriber, or a ``zope.event`` subscriber)
are announced, so a process that never subscribes pays nothing per post.

The key: ``event.message.key`` is the key the post proposed. When another writer
committed to the room in between, conflict resolution raised it (never lowered it);
`MessagePosted.stored_message` reads the final one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import transaction
from transaction.interfaces import NoTransaction

try:
    import zope.event as zope_event
except ImportError:  # optional: without it, only `subscribers` are told
    zope_event = None

from .message import Message

__all__ = ["MessagePosted", "Subscribers", "subscribers", "subscribe", "announce_after_commit"]

log = logging.getLogger(__name__)

Subscriber = Callable[["MessagePosted"], None]


class MessagePosted:
    """See `IMessagePosted`."""

    def __init__(self, message: Message, room_oid: bytes | None, database: Any) -> None:
        self.message = message
        self.room = message.room
        self.room_oid = room_oid
        self.database = database

    def __repr__(self) -> str:
        return f"<MessagePosted {self.message.id} in {self.room!r}>"

    def stored_message(self) -> Message:
        """See `IMessagePosted`."""
        if self.database is None or self.room_oid is None:
            return self.message
        manager = transaction.TransactionManager(explicit=True)
        connection = self.database.open(transaction_manager=manager)
        try:
            manager.begin()
            found = connection.get(self.room_oid).find_message(
                self.message.id, from_key=self.message.key
            )
            return self.message if found is None else found
        finally:
            manager.abort()
            connection.close()


class Subscribers:
    """See `ISubscribers`. Like `zope.event.subscribers`, one per process: `subscribers`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """See `ISubscribers`."""
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)

        def unsubscribe() -> None:
            with self._lock:
                kept = list(self._subscribers)
                if subscriber in kept:
                    kept.remove(subscriber)
                self._subscribers = tuple(kept)

        return unsubscribe

    def __len__(self) -> int:
        return len(self._subscribers)

    def notify(self, event: MessagePosted) -> None:
        """See `ISubscribers`."""
        for subscriber in self._subscribers:  # a snapshot: subscribing while notifying is safe
            try:
                subscriber(event)
            except Exception:
                log.exception("a subscriber failed on %r", event)
        if zope_event is None:
            return
        try:
            zope_event.notify(event)
        except Exception:
            log.exception("a zope.event subscriber failed on %r", event)


# The process's subscribers: the after-commit hooks of every transaction notify it.
subscribers = Subscribers()
subscribe = subscribers.subscribe


def announce_after_commit(session: Any, message: Message) -> None:
    """Have `subscribers` told about ``message`` once the transaction holding it commits.

    Called by `ChatSession` for every message it adds. The transaction is the one of
    the session's connection, or, for a session not yet added to a database, the
    calling thread's current one of the default manager (``transaction.manager``).
    An application whose transactions use other managers (pyramid_tm in explicit
    mode) adds a new session to its connection (``connection.add``) before posting.
    """
    if not _listened():
        return  # the common case (a terminal, a script): costs a post nothing
    jar = session._p_jar
    manager = jar.transaction_manager if jar is not None else transaction.manager
    try:
        current = manager.get()
    except NoTransaction:  # an explicit manager outside a transaction: nothing to hook
        return
    try:
        posted = current.data(_Posted)
    except KeyError:
        posted = _Posted(manager)
        current.set_data(_Posted, posted)
        current.join(posted)
        current.addAfterCommitHook(_committed, (posted,))
    posted.messages.append((session, message))


class _Posted:
    """The messages one transaction posted, as a data manager that stores nothing.

    Joining the transaction is what makes savepoints work: rolling one back rolls
    this back too (`_Rollback`), so a message posted after it is never announced.
    """

    def __init__(self, manager: Any) -> None:
        self.transaction_manager = manager
        self.messages: list[tuple[Any, Message]] = []

    def abort(self, txn: Any) -> None:
        del self.messages[:]

    def tpc_abort(self, txn: Any) -> None:
        del self.messages[:]

    def tpc_begin(self, txn: Any) -> None:
        pass

    def commit(self, txn: Any) -> None:
        pass

    def tpc_vote(self, txn: Any) -> None:
        pass

    def tpc_finish(self, txn: Any) -> None:
        pass

    def sortKey(self) -> str:  # noqa: N802 (transaction's name)
        return "~chatzeo.events"

    def savepoint(self) -> _Rollback:
        return _Rollback(self, len(self.messages))


class _Rollback:
    def __init__(self, posted: _Posted, length: int) -> None:
        self._posted = posted
        self._length = length

    def rollback(self) -> None:
        del self._posted.messages[self._length :]


def _committed(status: bool, posted: _Posted) -> None:
    if not status:
        return
    messages, posted.messages = posted.messages, []
    for session, message in messages:
        jar = session._p_jar  # set by now even for a session added in this transaction
        event = MessagePosted(message, session._p_oid, jar.db() if jar is not None else None)
        subscribers.notify(event)


def _listened() -> bool:
    """Whether anyone would hear of a post (checked when it is made)."""
    return bool(len(subscribers) or (zope_event is not None and zope_event.subscribers))
