"""Running a unit of work in its own transaction, retried on transient errors.

`run_in_transaction` opens a private connection with a private transaction manager,
so whatever the caller's own transaction holds is never committed by it. Retries
use full-jitter exponential backoff and are bounded by time and by attempts;
when the budget is spent it raises `RetryLimitExceeded`.

Runs entirely in the calling thread.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import transaction
from transaction.interfaces import TransientError
from ZODB.Connection import Connection

from . import postgres
from .errors import RetryLimitExceeded

__all__ = [
    "RetryPolicy",
    "run_in_transaction",
    "with_retries",
    "is_transient",
    "commit_deadline",
]

# When the innermost run_in_transaction of this thread gives up (time.monotonic).
_deadline: ContextVar[float | None] = ContextVar("chatzeo_commit_deadline", default=None)


def commit_deadline() -> float | None:
    """The `time.monotonic` time by which the `run_in_transaction` running in this
    thread gives up, or None outside one. A storage may bound its waits by it (the
    ZEO client's wait for the commit lock: `chatzeo.database`)."""
    return _deadline.get()

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a transaction is retried.

    The n-th retry sleeps a random time in ``[0, min(max_delay, base_delay * 2**n))``
    ("full jitter"), so writers that collided once spread out instead of colliding again.
    """

    max_seconds: float = 15.0
    max_attempts: int = 1000
    base_delay: float = 0.001
    max_delay: float = 0.25
    # Called with each error that is about to be retried (the load test counts them).
    on_retry: Callable[[BaseException], None] | None = None

    def delay(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to sleep before retry number ``retry`` (0 for the first retry)."""
        ceiling: float = min(self.max_delay, self.base_delay * 2.0 ** min(retry, 30))
        return rng() * ceiling


DEFAULT_POLICY = RetryPolicy()


def run_in_transaction(
    db: Any,
    work: Callable[[Connection], T],
    *,
    what: str = "transaction",
    policy: RetryPolicy = DEFAULT_POLICY,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    then: Callable[[Connection, T], T] | None = None,
) -> T:
    """Call ``work(connection)`` in a fresh transaction of a private connection to
    ``db`` and commit; on a retryable error abort, back off and call it again.

    ``work`` must be safe to call again after an attempt whose commit raised (for a
    lost server the commit may have landed anyway). Returns what the successful call
    returned. Raises `RetryLimitExceeded` when the policy's bound is reached, and any
    non-retryable error at once.

    ``then(connection, result)``, if given, runs after the commit in a fresh
    transaction of the same connection, so it reads what was committed (conflict
    resolution may have changed it); its result is returned instead. Its failures
    are not retried: the commit stands, and ``result`` is returned.
    """
    manager = transaction.TransactionManager(explicit=True)
    connection = db.open(transaction_manager=manager)

    def attempt() -> T:
        try:
            # Inside the try: RelStorage polls the database here, so a lost
            # server shows up at begin() as well as at commit().
            manager.begin()
            done = work(connection)
            manager.commit()
        except Exception:
            manager.abort()
            raise
        return done

    token = _deadline.set(time.monotonic() + policy.max_seconds)
    try:
        result = with_retries(
            attempt,
            retryable=lambda error: is_transient(db, error),
            what=what,
            policy=policy,
            clock=clock,
            sleep=sleep,
        )
        if then is None:
            return result
        try:
            manager.begin()
            return then(connection, result)
        except Exception:
            return result
        finally:
            manager.abort()
    finally:
        _deadline.reset(token)
        connection.close()


def with_retries(
    attempt: Callable[[], T],
    *,
    retryable: Callable[[BaseException], bool],
    what: str = "transaction",
    policy: RetryPolicy = DEFAULT_POLICY,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``attempt()`` until it returns; after an error for which ``retryable``
    is true, back off (`RetryPolicy.delay`) and call it again. chatzeo's one retry
    loop: `run_in_transaction` (writes) and `chatzeo.client` (reads) use it.

    Raises `RetryLimitExceeded` once the policy's time or attempt bound is reached,
    and any other error at once. ``attempt`` cleans up after itself (aborts).
    """
    started = clock()
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt()
        except Exception as error:
            if not retryable(error):
                raise
            elapsed = clock() - started
            if attempts >= policy.max_attempts or elapsed >= policy.max_seconds:
                raise RetryLimitExceeded(what, attempts, elapsed, error) from error
            if policy.on_retry is not None:
                policy.on_retry(error)
            sleep(min(policy.delay(attempts - 1), max(0.0, policy.max_seconds - elapsed)))


def is_transient(db: Any, error: BaseException) -> bool:
    """True if ``error`` means "try again later": a conflict, or a lost server or
    database (which reconnects by itself). Public API only: transaction's own
    check (``TransactionManager._retryable``) adds data managers' ``should_retry``,
    which neither ZODB's connections nor RelStorage define."""
    return isinstance(error, TransientError) or postgres.lost_database(db.storage, error)
