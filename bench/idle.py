"""Idle cost: what a client that only waits for messages costs, push vs polling.

A child process opens the room (chatzeo: `ChatClient.join` then `wait`/`receive`;
seed: its reader polling ``new_messages`` every 0.2 s), then sits idle while nobody
posts. Every message the ZEO client writes to its socket is counted by wrapping the
protocol's ``write_message`` (`_count_messages`), split into requests and ZEO's
keepalive frames; CPU time is read from the process's own clock. Both clients run at
the same time, in separate processes.

Threads: `measure` runs in the benchmark's main thread; `_idle` is a child's main
thread; the counting wrapper runs on the child's ZEO IO thread.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import transaction

__all__ = ["IdleResult", "measure"]


@dataclass
class IdleResult:
    system: str
    room_size: int
    seconds: float
    setup_requests: int  # while opening the room: shows the counter counts
    requests: int
    keepalives: int
    bytes_sent: int
    cpu_seconds: float
    keepalive_interval: float

    def per_minute(self, value: float) -> float:
        return value * 60.0 / self.seconds


class _Counter:
    def __init__(self) -> None:
        self.requests = 0
        self.keepalives = 0
        self.bytes = 0
        self.interval = 0.0


def _count_messages(counter: _Counter) -> None:
    """Count every message each new ZEO client connection writes from now on."""
    from ZEO.asyncio import client

    original = client.Protocol.connection_made

    def connection_made(protocol: Any, transport: Any) -> None:
        original(protocol, transport)
        write, write_iter = protocol.write_message, protocol.write_message_iter
        counter.interval = protocol.heartbeat_interval

        def count(message: bytes) -> None:
            if message == getattr(protocol, "heartbeat_bytes", None):
                counter.keepalives += 1
            else:
                counter.requests += 1
            counter.bytes += len(message)

        def counted(message: bytes) -> None:
            count(message)
            write(message)

        def counted_iter(messages: Iterable[bytes]) -> None:
            def each() -> Iterable[bytes]:
                for message in messages:
                    count(message)
                    yield message

            write_iter(each())

        protocol.write_message = counted
        protocol.write_message_iter = counted_iter

    client.Protocol.connection_made = connection_made


def _idle(system: str, address: str, room: str, size: int, seconds: float, out: Any) -> None:
    counter = _Counter()
    _count_messages(counter)
    from chatzeo.client import ChatClient
    from chatzeo.database import open_db

    from .peers import seed_db
    from .seed import POLL_SECONDS, seed_room

    if system == "chatzeo":
        db = open_db(address)
        client = ChatClient(db)
        client.join(room, history=50)
    else:
        db = seed_db(address)
        connection = db.open()
        session = seed_room(connection, room)
        session.new_messages()
    setup = counter.requests
    counter.requests = counter.keepalives = counter.bytes = 0
    cpu = time.process_time()
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if system == "chatzeo":
            if client.wait(remaining):
                client.receive()
        else:
            time.sleep(min(POLL_SECONDS, remaining))
            transaction.begin()
            session.new_messages()
    result = IdleResult(system, size, seconds, setup, counter.requests, counter.keepalives,
                        counter.bytes, time.process_time() - cpu, counter.interval)
    if system == "chatzeo":
        client.close()
    else:
        connection.close()
    db.close()
    out.put(result)


def measure(address: str, room: str, size: int, seconds: float) -> list[IdleResult]:
    """Run an idle chatzeo client and an idle seed client on ``room`` for ``seconds``."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    processes = [
        context.Process(target=_idle, args=(system, address, room, size, seconds, out))
        for system in ("chatzeo", "seed")
    ]
    for process in processes:
        process.start()
    try:
        results = [out.get(timeout=seconds + 120) for _ in processes]
    finally:
        for process in processes:
            process.join(30)
    return sorted(results, key=lambda result: result.system)
