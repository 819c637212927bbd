"""History cost: what reading a room costs as its history grows, chatzeo vs the seed.

`build` writes rooms of each size into one FileStorage (``post()`` in big
transactions for chatzeo, bulk inserts for the seed); `measure` opens it without ZEO
and times, per size:

``new_messages``  a reader whose cursor is at the end gets the one message another
                  connection just committed (chatzeo: range search from the cursor;
                  seed: full scan of the tree).
``latest 50``     chatzeo's `latest(50)`; the seed has no such call, a joining seed
                  client gets the whole history from its first ``new_messages`` and
                  shows the end of it, so that is what is timed for it.

The same storage then serves the memory measure (`bench.memory`) through ZEO.
Everything runs in the benchmark's main thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from chatzeo.realm import get_root
from chatzeo.session import ChatSession
from chatzeo.testing import percentile

from .seed import SeedChatSession, fill, seed_room

__all__ = ["HistoryResult", "build", "measure", "room_name", "post_many"]

_BATCH = 100_000


@dataclass
class HistoryResult:
    system: str
    size: int
    new_messages: float  # seconds per call, median
    new_iterations: int
    latest: float
    latest_iterations: int


def post_many(
    connection: ZODB.Connection.Connection, room: ChatSession, count: int, text: str,
    batch: int,
) -> None:
    """Post ``count`` messages ``TEXT N`` by alice to ``room`` in the default transaction
    manager, committing every ``batch`` and emptying ``connection``'s cache after each
    commit, so that building a large room keeps memory flat."""
    for index in range(count):
        room.post(f"{text} {index}", "alice")
        if (index + 1) % batch == 0:
            transaction.commit()
            connection.cacheMinimize()
    transaction.commit()


def room_name(size: int) -> str:
    return f"history-{size}"


def build(path: Path, sizes: list[int], progress: Callable[[str], None]) -> None:
    """Write a chatzeo room and a seed room of each size into the FileStorage ``path``."""
    db = ZODB.DB(FileStorage(str(path)))
    try:
        connection = db.open()
        root = get_root(connection)
        for size in sizes:
            progress(f"history: building {size:,} messages")
            room = root.room(room_name(size))
            transaction.commit()
            post_many(connection, room, size, "history message", _BATCH)
            fill(seed_room(connection, room_name(size)), size, transaction.commit, _BATCH)
            connection.cacheMinimize()
        connection.close()
    finally:
        db.close()


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _chatzeo(db: ZODB.DB, size: int, iterations: int) -> HistoryResult:
    writer_tm, reader_tm = transaction.TransactionManager(), transaction.TransactionManager()
    writer = db.open(transaction_manager=writer_tm)
    reader = db.open(transaction_manager=reader_tm)
    wroom: ChatSession = get_root(writer).rooms[room_name(size)]
    rroom: ChatSession = get_root(reader).rooms[room_name(size)]
    rroom.skip_to_end()
    new_times = []
    for index in range(iterations + 1):
        wroom.post(f"new message {index}", "bob")
        writer_tm.commit()
        reader_tm.begin()
        started = time.perf_counter()
        got = rroom.new_messages()
        elapsed = time.perf_counter() - started
        if len(got) != 1:
            raise AssertionError(f"new_messages returned {len(got)} messages, not 1")
        if index:  # the first call loads the path to the tree's end
            new_times.append(elapsed)
    latest_times = []
    for index in range(iterations + 1):
        reader_tm.begin()
        elapsed = _timed(lambda: rroom.latest(50))
        if index:
            latest_times.append(elapsed)
    writer.close()
    reader.close()
    return HistoryResult("chatzeo", size, percentile(new_times, 0.5), len(new_times),
                         percentile(latest_times, 0.5), len(latest_times))


def _seed(db: ZODB.DB, size: int, iterations: int) -> HistoryResult:
    # The seed commits through the thread's default transaction manager.
    writer = db.open()
    reader_tm = transaction.TransactionManager()
    reader = db.open(transaction_manager=reader_tm)
    wroom: SeedChatSession = seed_room(writer, room_name(size))
    rroom: SeedChatSession = seed_room(reader, room_name(size))
    rroom.new_messages()
    new_times = []
    for index in range(iterations):
        wroom.add_message(f"new message {index}")
        reader_tm.begin()
        started = time.perf_counter()
        got = rroom.new_messages()
        elapsed = time.perf_counter() - started
        if len(got) != 1:
            raise AssertionError(f"seed new_messages returned {len(got)} messages, not 1")
        new_times.append(elapsed)

    def join_and_show() -> None:
        # A fresh reader: the seed's first new_messages() is the whole history.
        del rroom._v_last_time
        rroom.new_messages()[-50:]

    latest_times = []
    for _ in range(iterations):
        reader_tm.begin()
        latest_times.append(_timed(join_and_show))
    writer.close()
    reader.close()
    return HistoryResult("seed", size, percentile(new_times, 0.5), len(new_times),
                         percentile(latest_times, 0.5), len(latest_times))


def measure(path: Path, sizes: list[int], chatzeo_iterations: int,
            seed_budget: float, progress: Callable[[str], None]) -> list[HistoryResult]:
    """Time both designs on the rooms `build` wrote. The seed gets as many iterations
    (3 to 30) as fit in about ``seed_budget`` seconds at each size."""
    db = ZODB.DB(FileStorage(str(path)))
    results = []
    try:
        for size in sizes:
            progress(f"history: chatzeo at {size:,}")
            results.append(_chatzeo(db, size, chatzeo_iterations))
            progress(f"history: seed full scan at {size:,}")
            probe = _seed(db, size, 1)
            per_call = max(probe.new_messages, probe.latest, 1e-6)
            iterations = max(3, min(30, int(seed_budget / (2 * per_call))))
            results.append(_seed(db, size, iterations))
    finally:
        db.close()
    return results
