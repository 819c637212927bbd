"""`RetryPolicy.on_retry` hears every retry, with the error that caused it."""

from __future__ import annotations

from typing import Any

import pytest
import ZODB
from ZODB.POSException import ConflictError

from chatzeo.errors import RetryLimitExceeded
from chatzeo.retry import RetryPolicy, run_in_transaction


def test_on_retry_is_called_before_each_retry_and_not_on_success() -> None:
    db = ZODB.DB(None)
    seen: list[BaseException] = []
    calls = 0

    def work(connection: Any) -> str:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConflictError(f"conflict {calls}")
        return "done"

    policy = RetryPolicy(base_delay=0.0, on_retry=seen.append)
    assert run_in_transaction(db, work, policy=policy, sleep=lambda _: None) == "done"
    assert [str(error) for error in seen] == ["conflict 1", "conflict 2"]
    assert all(isinstance(error, ConflictError) for error in seen)
    db.close()


def test_on_retry_is_not_called_when_giving_up() -> None:
    db = ZODB.DB(None)
    seen: list[BaseException] = []

    def work(connection: Any) -> None:
        raise ConflictError("always")

    policy = RetryPolicy(max_attempts=3, base_delay=0.0, on_retry=seen.append)
    with pytest.raises(RetryLimitExceeded):
        run_in_transaction(db, work, policy=policy, sleep=lambda _: None)
    assert len(seen) == 2  # attempts 1 and 2 were retried; attempt 3 gave up
    db.close()
