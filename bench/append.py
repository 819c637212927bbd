"""Append: `ChatSession.add_message` latency and throughput, with 1 to 8 writer processes.

Each writer is a separate process with its own ZEO client; all start together and
post back to back for a fixed time into one room. Conflicts and retries are counted
through `RetryPolicy.on_retry`; afterwards the room's history is read back and every
id a writer was told was committed must be in it exactly once ("lost" and
"duplicated" must be 0).

The CPU time the writers and the server used during the window is recorded too:
on a small machine it tells whether the writers wait on each other or on the CPUs.

Threads: `measure` runs in the benchmark's main thread; `_writer` is the main
thread of a child process.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any

from ZODB.POSException import ConflictError

from chatzeo.database import open_db
from chatzeo.errors import RetryLimitExceeded
from chatzeo.realm import get_root
from chatzeo.retry import RetryPolicy, run_in_transaction
from chatzeo.testing import percentile

__all__ = ["AppendResult", "measure"]


@dataclass
class AppendResult:
    writers: int
    seconds: float
    committed: int
    conflicts: int
    retries: int
    gave_up: int
    lost: int
    duplicated: int
    p50: float
    p99: float
    writers_cpu: float
    server_cpu: float

    @property
    def throughput(self) -> float:
        return self.committed / self.seconds

    @property
    def cpu_share(self) -> float:
        """CPU time used by writers and server, as a share of all the machine's CPUs."""
        return (self.writers_cpu + self.server_cpu) / (self.seconds * (os.cpu_count() or 1))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _writer(address: str, room: str, seconds: float, go: Any, ready: Any, out: Any) -> None:
    counts = {"conflicts": 0, "retries": 0}

    def on_retry(error: BaseException) -> None:
        counts["retries"] += 1
        if isinstance(error, ConflictError):
            counts["conflicts"] += 1

    policy = RetryPolicy(max_seconds=30.0, on_retry=on_retry)
    db = open_db(address)
    connection = db.open()
    session = get_root(connection).rooms[room]
    ready.release()
    go.wait()
    latencies: list[float] = []
    ids: list[str] = []
    gave_up = 0
    cpu = time.process_time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            message = session.add_message(f"bench message {len(ids)}", "writer", policy=policy)
        except RetryLimitExceeded:
            gave_up += 1
            continue
        latencies.append(time.perf_counter() - started)
        ids.append(message.id)
    cpu = time.process_time() - cpu
    connection.close()
    db.close()
    out.put((latencies, ids, counts["conflicts"], counts["retries"], gave_up, cpu))


def measure(address: str, writers: int, seconds: float, server_pid: int) -> AppendResult:
    """``writers`` processes post into a fresh room for ``seconds``; returns the figures.
    ``server_pid`` is the ZEO server's process, whose CPU time is taken."""
    room = f"append-{writers}-{time.time_ns()}"
    db = open_db(address)
    try:
        run_in_transaction(db, lambda connection: get_root(connection).room(room))
        context = multiprocessing.get_context("spawn")
        go, ready, out = context.Event(), context.Semaphore(0), context.Queue()
        processes = [
            context.Process(target=_writer, args=(address, room, seconds, go, ready, out))
            for _ in range(writers)
        ]
        for process in processes:
            process.start()
        for _ in processes:
            if not ready.acquire(timeout=60):
                raise RuntimeError("a writer process did not connect")
        server_cpu = _cpu_seconds(server_pid)
        go.set()
        results = [out.get(timeout=seconds + 120) for _ in processes]
        # The last writer reports just after the window: close enough for a share.
        server_cpu = _cpu_seconds(server_pid) - server_cpu
        for process in processes:
            process.join(30)
        latencies = [value for result in results for value in result[0]]
        written = [message_id for result in results for message_id in result[1]]
        connection = db.open()
        stored = [message.id for message in get_root(connection).rooms[room].history()]
        connection.close()
    finally:
        db.close()
    stored_set = set(stored)
    return AppendResult(
        writers=writers,
        seconds=seconds,
        committed=len(written),
        conflicts=sum(result[2] for result in results),
        retries=sum(result[3] for result in results),
        gave_up=sum(result[4] for result in results),
        lost=sum(1 for message_id in written if message_id not in stored_set),
        duplicated=len(stored) - len(stored_set),
        p50=percentile(latencies, 0.50),
        p99=percentile(latencies, 0.99),
        writers_cpu=sum(result[5] for result in results),
        server_cpu=server_cpu,
    )
