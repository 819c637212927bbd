"""Delivery: post-to-screen latency from a writer process to a reader process.

The same paced schedule (gaps drawn once, 10-30 ms) drives every system, one system
at a time, so the figures compare like with like. `bench.peers` says how each system
writes and reads.

Threads: `measure` runs in the benchmark's main thread; `_read` and `_write` are the
main threads of child processes.
"""

from __future__ import annotations

import multiprocessing
import random
from dataclasses import dataclass, field
from typing import Any

from chatzeo.database import open_db
from chatzeo.realm import get_root
from chatzeo.retry import run_in_transaction
from chatzeo.testing import percentile

from .peers import READERS, WRITERS, seed_db
from .seed import seed_room

__all__ = ["DeliveryResult", "measure", "schedule", "prepare_room"]


@dataclass
class DeliveryResult:
    system: str
    sent: int
    latencies: list[float] = field(repr=False)
    writes: list[float] = field(repr=False)  # duration of each write call
    # Per message, latency minus its own write call: the reader's side of the delay.
    after_write: list[float] = field(repr=False)

    @property
    def received(self) -> int:
        return len(self.latencies)

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    @property
    def write_p50(self) -> float:
        return percentile(self.writes, 0.50)

    @property
    def after_write_p50(self) -> float:
        return percentile(self.after_write, 0.50)


def schedule(count: int, low: float = 0.010, high: float = 0.030) -> list[float]:
    """``count`` gaps in seconds between messages, the same in every run."""
    rng = random.Random(20261123)
    return [rng.uniform(low, high) for _ in range(count)]


def prepare_room(system: str, target: str, room: str) -> None:
    """Create the room before reader and writer start, so they do not race to create it."""
    if system.startswith("chatzeo"):
        db = open_db(target)
        try:
            run_in_transaction(db, lambda connection: get_root(connection).room(room))
        finally:
            db.close()
    elif system == "seed":
        db = seed_db(target)
        try:
            connection = db.open()
            seed_room(connection, room)
            connection.transaction_manager.commit()
            connection.close()
        finally:
            db.close()


def _read(system: str, target: str, room: str, count: int, timeout: float, ready: Any,
          out: Any) -> None:
    out.put(READERS[system](target, room, count, timeout, ready))


def _write(system: str, target: str, room: str, gaps: list[float], out: Any) -> None:
    out.put(WRITERS[system](target, room, gaps))


def measure(system: str, target: str, room: str, gaps: list[float],
            label: str | None = None) -> DeliveryResult:
    """Send ``len(gaps)`` messages through ``system`` at ``target`` (a ZEO address, or a
    redis port) and return their latencies as the reader saw them."""
    prepare_room(system, target, room)
    context = multiprocessing.get_context("spawn")
    ready, out, written = context.Event(), context.Queue(), context.Queue()
    timeout = sum(gaps) + 60
    reader = context.Process(
        target=_read, args=(system, target, room, len(gaps), timeout, ready, out)
    )
    reader.start()
    try:
        if not ready.wait(60):
            raise RuntimeError(f"{system} reader did not start")
        writer = context.Process(target=_write, args=(system, target, room, gaps, written))
        writer.start()
        latencies: dict[int, float] = out.get(timeout=timeout + 30)
        writes: list[float] = written.get(timeout=60)
        writer.join(60)
        if writer.exitcode != 0:
            raise RuntimeError(f"{system} writer failed with exit code {writer.exitcode}")
    finally:
        reader.join(30)
        if reader.is_alive():
            reader.kill()
    after = [latency - writes[index] for index, latency in latencies.items()]
    return DeliveryResult(label or system, len(gaps), list(latencies.values()), writes, after)
