"""How each compared system writes a message and hands it to a reader in another process.

Every writer stamps the message with ``time.time()`` just before its write call;
every reader takes ``time.time()`` when the message is handed to it, so a latency is
"post to screen" on one machine clock, commit included. Systems:

``chatzeo``  `ChatClient.send` / `ChatClient.wait` + `ChatClient.receive` (push).
``seed``     the seed's `SeedChatSession.add_message` / a reader polling every 0.2 s.
``redis``    Redis Streams ``XADD`` / ``XREAD BLOCK`` (redis-py).
``chatzeo-prefetch``  chatzeo with a change proposed for `chatzeo.delivery`, tried
             here only: when a push names the watched clock, ask ZEO at once for every
             object that commit changed (``ClientStorage.prefetch``), so ``receive``
             finds them in the client cache instead of loading them one by one.

Readers return each message's latency by its index. Writers return how long each
write call took (``send``, the seed's ``add_message``,
``XADD``): the part of the latency spent before the reader can possibly know.

Threads: each ``*_reader``/``*_writer`` function is the main thread of a child process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import transaction
import ZODB
from ZEO.ClientStorage import ClientStorage
from ZODB.utils import p64, u64

from chatzeo.client import ChatClient
from chatzeo.database import open_db, parse_address

from .seed import POLL_SECONDS, seed_room

__all__ = ["READERS", "WRITERS", "PREFETCH_LABEL", "seed_db", "stamp", "age"]

PREFETCH_LABEL = "chatzeo + prefetch (proposal)"


def stamp(index: int) -> str:
    return f"{time.time():.6f} {index}"


def age(text: str | bytes) -> tuple[int, float]:
    """The index and the seconds since the stamp of a message made by `stamp`."""
    now = time.time()
    if isinstance(text, bytes):
        text = text.decode()
    sent, index = text.split()
    return int(index), now - float(sent)


def seed_db(address: str) -> ZODB.DB:
    """A plain ZODB client, as the seed opened it (no class allowlist: the seed had none)."""
    return ZODB.DB(ClientStorage(parse_address(address), wait_timeout=30))


def _collect(latencies: dict[int, float], texts: Sequence[str | bytes]) -> None:
    for text in texts:
        index, seconds = age(text)
        # The seed re-delivers everything after its _v_ cursor is ghosted; count first sight.
        latencies.setdefault(index, seconds)


def _prefetch_on_push(db: Any, client: ChatClient) -> None:
    feed = client.feed
    storage = db.storage
    plain = feed._invalidate

    def invalidate(tid: bytes | None, oids: Iterable[bytes]) -> None:
        # Runs on ZEO's IO thread; prefetch only queues the loads. The reader's next
        # transaction reads as of the transaction after ``tid``, so load before that.
        oids = list(oids)
        if tid is not None and not feed._watched.isdisjoint(oids):
            storage.prefetch(oids, p64(u64(tid) + 1))
        plain(tid, oids)

    feed._invalidate = invalidate  # type: ignore[method-assign]


def chatzeo_reader(target: str, room: str, count: int, timeout: float, ready: Any,
                   prefetch: bool = False) -> dict[int, float]:
    db = open_db(target)
    client = ChatClient(db)
    client.join(room, history=0)
    if prefetch:
        _prefetch_on_push(db, client)
    ready.set()
    latencies: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(latencies) < count and time.monotonic() < deadline:
        if client.wait(1.0):
            _collect(latencies, [message.text for message in client.receive()])
    client.close()
    db.close()
    return latencies


def _timed(write: Callable[[str], object], gaps: Sequence[float]) -> list[float]:
    durations = []
    for index, gap in enumerate(gaps):
        time.sleep(gap)
        started = time.perf_counter()
        write(stamp(index))
        durations.append(time.perf_counter() - started)
    return durations


def chatzeo_writer(target: str, room: str, gaps: Sequence[float]) -> list[float]:
    db = open_db(target)
    client = ChatClient(db)
    client.join(room, history=0)
    durations = _timed(client.send, gaps)
    client.close()
    db.close()
    return durations


def seed_reader(target: str, room: str, count: int, timeout: float, ready: Any) -> dict[int, float]:
    db = seed_db(target)
    connection = db.open()
    session = seed_room(connection, room)
    session.new_messages()
    ready.set()
    latencies: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(latencies) < count and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        transaction.begin()
        _collect(latencies, session.new_messages())
    connection.close()
    db.close()
    return latencies


def seed_writer(target: str, room: str, gaps: Sequence[float]) -> list[float]:
    db = seed_db(target)
    connection = db.open()
    session = seed_room(connection, room)
    durations = _timed(session.add_message, gaps)
    connection.close()
    db.close()
    return durations


def redis_reader(
    target: str, room: str, count: int, timeout: float, ready: Any
) -> dict[int, float]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=int(target))
    client.ping()
    ready.set()
    latencies: dict[int, float] = {}
    last: Any = "0-0"
    deadline = time.monotonic() + timeout
    while len(latencies) < count and time.monotonic() < deadline:
        reply: Any = client.xread({room: last}, block=1000)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                _collect(latencies, [fields[b"m"]])
    client.close()
    return latencies


def redis_writer(target: str, room: str, gaps: Sequence[float]) -> list[float]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=int(target))
    durations = _timed(lambda text: client.xadd(room, {"m": text}), gaps)
    client.close()
    return durations


def chatzeo_prefetch_reader(target: str, room: str, count: int, timeout: float,
                            ready: Any) -> dict[int, float]:
    return chatzeo_reader(target, room, count, timeout, ready, prefetch=True)


READERS = {"chatzeo": chatzeo_reader, "chatzeo-prefetch": chatzeo_prefetch_reader,
           "seed": seed_reader, "redis": redis_reader}
WRITERS = {"chatzeo": chatzeo_writer, "chatzeo-prefetch": chatzeo_writer,
           "seed": seed_writer, "redis": redis_writer}
