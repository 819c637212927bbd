"""What read markers and unread counts cost (issue 15): `scripts/bench-unread`.

Two measurements, each printed as a figure (nothing here asserts a speed):

1. Unread counts for many big rooms against as many small ones, in one database and
   one run. The rooms are built quickly by writing their message trees directly
   (one process, a FileStorage, sorted ``LOBTree.update`` batches), with clocks that
   agree with them (``head``, ``count``, ``total``, ``flushed``), then ``--unread``
   real posts on top of each, some mentioning the reader, whose marker sits below
   them. A `chatzeo serve` then serves the file and a fresh ZEO client (cold cache)
   computes `chatzeo.unread.unread_rooms` for the reader: without mentions
   (arithmetic on marker and clock) and with mentions (a search of the unread
   messages), counting the records it loads. Then again warm.
2. Marker writes of an active reader: a writer thread posts ``--rate`` messages a
   second for ``--seconds``; the reader does what the terminal's worker does (read
   what is new, `ChatClient.mark_read` the newest, `ChatClient.flush_marks`) and the
   run counts its commits per minute against the messages it read.

Runs in its main thread, except the writer thread of (2), which has its own
database and client.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import transaction

from chatzeo import ChatClient, get_root, open_db
from chatzeo.session import ChatSession
from chatzeo.testing import ServerProcess, percentile
from chatzeo.unread import room_unread

READER = "reader"
BATCH = 200_000


def build(path: Path, rooms: int, big: int, small: int, unread: int) -> float:
    """Write ``rooms`` rooms of ``big`` and as many of ``small`` messages into a new
    FileStorage at ``path``, each with ``unread`` newer posts above the reader's
    marker; returns the seconds it took."""
    import ZODB
    from ZODB.FileStorage import FileStorage

    started = time.perf_counter()
    db = ZODB.DB(FileStorage(str(path)))
    connection = db.open()
    root = get_root(connection)
    reader = root.user(READER)
    transaction.commit()
    base = int(time.time() * 1_000_000) - 10 * max(big, small) - 1_000_000
    for size, prefix in ((big, "big"), (small, "small")):
        for index in range(rooms):
            room: ChatSession = root.room(f"{prefix}-{index:02d}")
            transaction.commit()
            tree = room._messages
            for start in range(0, size, BATCH):
                stop = min(size, start + BATCH)
                # Ids must be unique; author and text are shared strings (their size
                # does not matter to a count that does not read them).
                tree.update(
                    [(base + key, (f"{key:x}", "writer", "old news", 0)) for key in
                     range(start, stop)]
                )
                transaction.commit()
                connection.cacheMinimize()
            clock = room._clock
            clock.head = clock.flushed = base + size - 1
            clock.count = clock.total = size
            reader.join(room.name)
            reader.own_markers().mark(room, clock.head)
            transaction.commit()
            for post in range(unread):
                text = f"@{READER} look at this" if post % 5 == 0 else f"new {post}"
                room.post(text, "writer")
                transaction.commit()
    connection.close()
    db.close()
    return time.perf_counter() - started


class LoadCounter:
    """Counts the records a ZEO client loads from its server (cache misses)."""

    def __init__(self, storage: Any) -> None:
        self.loads = 0
        self._storage = storage
        self._load_before = storage.loadBefore
        storage.loadBefore = self._counted

    def _counted(self, oid: bytes, tid: bytes) -> Any:
        self.loads += 1
        return self._load_before(oid, tid)


def time_counts(address: str, prefix: str, mentions: bool, repeat: int) -> dict[str, float]:
    """Cold (fresh client) then warm timings of `unread_rooms` over the rooms named
    ``prefix-*``; each a median of ``repeat`` runs."""
    cold, warm, loads = [], [], []
    result: list[Any] = []
    for _ in range(repeat):
        db = open_db(address, wait=60)
        try:
            counter = LoadCounter(db.storage)
            manager = transaction.TransactionManager(explicit=True)
            connection = db.open(transaction_manager=manager)
            manager.begin()
            root = get_root(connection)
            user = root.users[READER]
            names = [name for name in user.joined if name.startswith(prefix)]
            for name in names:  # the rooms themselves are found, not counted
                root.rooms[name]
            before = counter.loads
            started = time.perf_counter()
            result = _counts(root, names, mentions)
            cold.append(time.perf_counter() - started)
            loads.append(counter.loads - before)
            started = time.perf_counter()
            _counts(root, names, mentions)
            warm.append(time.perf_counter() - started)
            manager.abort()
            connection.close()
        finally:
            db.close()
    return {
        "rooms": len(result),
        "unread": sum(row.unread for row in result),
        "mentions": sum(row.mentions for row in result),
        "cold_ms": percentile(cold, 0.50) * 1000,
        "warm_ms": percentile(warm, 0.50) * 1000,
        "loads": percentile(loads, 0.50),
    }


def _counts(root: Any, names: list[str], mentions: bool) -> list[Any]:
    """What `chatzeo.unread.unread_rooms` computes, for the rooms ``names`` only."""
    user = root.users[READER]
    return [room_unread(user, root.rooms[name], count_mentions=mentions) for name in names]


def active_reader(address: str, seconds: float, rate: float) -> dict[str, float]:
    """Marker commits of a reader that reads everything a writer posts at ``rate``/s."""
    reader_db = open_db(address, wait=60)
    writer_db = open_db(address, wait=60)
    reader = ChatClient(reader_db, "active")
    writer = ChatClient(writer_db, "poster")
    try:
        reader.join("busy", history=0, remember=True)
        writer.join("busy", history=0)
        stop = threading.Event()
        posted = [0]

        def post() -> None:
            next_at = time.monotonic()
            while not stop.is_set():
                writer.send(f"message {posted[0]}")
                posted[0] += 1
                next_at += 1 / rate
                stop.wait(max(0.0, next_at - time.monotonic()))

        thread = threading.Thread(target=post, name="writer")
        commits = read = 0
        started = time.monotonic()
        thread.start()
        while time.monotonic() - started < seconds:
            reader.wait(0.5)
            for messages in reader.receive_all().values():
                read += len(messages)
                reader.mark_read("busy", messages[-1].key)
            if reader.flush_marks():
                commits += 1
        stop.set()
        thread.join(10)
        if reader.flush_marks(force=True):  # leaving writes the last one
            commits += 1
        elapsed = time.monotonic() - started
        return {
            "seconds": elapsed,
            "posted": posted[0],
            "read": read,
            "marker_commits": commits,
            "per_minute": commits * 60 / elapsed,
            "read_per_minute": read * 60 / elapsed,
        }
    finally:
        writer.close()
        reader.close()
        writer_db.close()
        reader_db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=50)
    parser.add_argument("--messages", type=int, default=1_000_000, help="per big room")
    parser.add_argument("--small", type=int, default=1_000, help="messages per small room")
    parser.add_argument("--unread", type=int, default=20, help="new posts above the marker")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="active reader's run")
    parser.add_argument("--rate", type=float, default=10.0, help="writer's posts per second")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the database here")
    args = parser.parse_args(argv)

    directory = args.keep or Path(tempfile.mkdtemp(prefix="chatzeo-unread-"))
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "chat.fs"
    if data.exists() and args.keep:
        from ZODB.FileStorage import FileStorage

        # Opening and closing it here (re)writes its index, which a server killed
        # before it could save one would otherwise rebuild while we wait for it.
        FileStorage(str(data)).close()
        print(f"reusing {data} ({data.stat().st_size / 1e6:.0f} MB)")
    else:
        seconds = build(data, args.rooms, args.messages, args.small, args.unread)
        print(
            f"built {args.rooms} rooms of {args.messages:,} and {args.rooms} of "
            f"{args.small:,} messages (+{args.unread} unread each) in {seconds:.0f} s, "
            f"{data.stat().st_size / 1e6:.0f} MB"
        )
    print(f"machine: {os.cpu_count()} cores; figures are medians of {args.repeat} runs")
    # ZEO's server reads the oids of its last 10,000 transactions when it starts
    # (its invalidation queue); the build's huge transactions make that slow.
    server = ServerProcess(directory).start(timeout=600)
    try:
        print("\nunread counts for the reader (one fresh ZEO client per run):")
        print(f"{'rooms':>18} {'mentions':>9} {'cold ms':>9} {'warm ms':>9} {'loads':>6}"
              f" {'unread':>7} {'found':>6}")
        for prefix, size in (("big", args.messages), ("small", args.small)):
            for mentions in (False, True):
                row = time_counts(server.address, prefix, mentions, args.repeat)
                label = f"{row['rooms']} x {size:,}"
                print(
                    f"{label:>18} {'yes' if mentions else 'no':>9} {row['cold_ms']:9.1f} "
                    f"{row['warm_ms']:9.2f} {row['loads']:6.0f} {row['unread']:7.0f} "
                    f"{row['mentions']:6.0f}"
                )
        print(f"\nactive reader, writer at {args.rate:g}/s for {args.seconds:g} s:")
        active = active_reader(server.address, args.seconds, args.rate)
        print(
            f"  read {active['read']:.0f} of {active['posted']:.0f} messages "
            f"({active['read_per_minute']:.0f}/min) with {active['marker_commits']:.0f} "
            f"marker commits = {active['per_minute']:.1f} per minute"
        )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
