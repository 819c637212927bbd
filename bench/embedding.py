"""What the embedding readers cost: ``python -m bench.embedding [--sizes 1000,100000]``.

For each room size, in a FileStorage opened without ZEO:

``messages_after (pooled)``  a web request: open a connection from the pool, read the
                             one message committed after the key it carries, close.
``messages_after (kept)``    the same read on a connection kept open (a worker).
``new_messages``             the classic per-connection cursor, for comparison.

Then, through a real ``chatzeo serve``, the live-page path: a writer process's
``add_message`` returning to the message coming out of a `chatzeo.watch` in this one
(``watch delivery``). Prints medians (and p99 for delivery); asserts only that every
read returned the one message. Runs in the main thread, the watch in a second one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import transaction
import ZODB
from ZODB.FileStorage import FileStorage

import chatzeo
from chatzeo.realm import get_root
from chatzeo.testing import ServerProcess, percentile

from .history import post_many
from .stats import ms

_BATCH = 10_000
_WRITER = """
import sys, time
from chatzeo import open_db, get_root, run_in_transaction
db = open_db(sys.argv[1])
run_in_transaction(db, lambda c: get_root(c).room("live"))
import transaction
manager = transaction.TransactionManager()
room = get_root(db.open(transaction_manager=manager)).rooms["live"]
for index in range(int(sys.argv[2])):
    sys.stdin.readline()              # paced by the reader: one post per line
    room.add_message(f"live {index}", "writer")
    print(time.time(), flush=True)    # when the commit returned
db.close()
"""


def _build(path: Path, size: int) -> None:
    db = ZODB.DB(FileStorage(str(path)))
    connection = db.open()
    room = get_root(connection).room(f"room-{size}")
    transaction.commit()
    post_many(connection, room, size, "message", _BATCH)
    connection.close()
    db.close()


def _readers(path: Path, size: int, iterations: int) -> dict[str, float]:
    db = ZODB.DB(FileStorage(str(path)))
    name = f"room-{size}"
    writer_tm = transaction.TransactionManager()
    writer = db.open(transaction_manager=writer_tm)
    wroom = get_root(writer).rooms[name]
    # Each reader has its own connection, so each pays for loading the changed clock.
    kept_tm, cursor_tm = transaction.TransactionManager(), transaction.TransactionManager()
    kept = get_root(db.open(transaction_manager=kept_tm)).rooms[name]
    cursor = get_root(db.open(transaction_manager=cursor_tm)).rooms[name]
    cursor.skip_to_end()
    times: dict[str, list[float]] = {"pooled": [], "kept": [], "new_messages": []}
    for index in range(iterations + 1):
        before = wroom.last_key
        wroom.post(f"new {index}", "bob")
        writer_tm.commit()

        started = time.perf_counter()
        request = db.open()  # the pool hands back the same connection, cache and all
        got = get_root(request).rooms[name].messages_after(before)
        transaction.abort()
        request.close()
        pooled = time.perf_counter() - started

        kept_tm.begin()
        started = time.perf_counter()
        got_kept = kept.messages_after(before)
        kept_time = time.perf_counter() - started
        cursor_tm.begin()
        started = time.perf_counter()
        got_new = cursor.new_messages()
        new_time = time.perf_counter() - started
        if not (len(got) == len(got_kept) == len(got_new) == 1):
            raise AssertionError("a reader did not return exactly the one new message")
        if index:  # the first loads the path to the tree's end
            times["pooled"].append(pooled)
            times["kept"].append(kept_time)
            times["new_messages"].append(new_time)
    db.close()
    return {key: percentile(values, 0.5) for key, values in times.items()}


def _delivery(work: Path, count: int) -> tuple[float, float]:
    with ServerProcess(work / "zeo") as server:
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, server.address, str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert writer.stdin is not None and writer.stdout is not None
        db = chatzeo.open_db(server.address)
        try:
            chatzeo.run_in_transaction(db, lambda c: get_root(c).room("live"))
            arrivals: list[float] = []
            watching = chatzeo.watch(db, "live")

            def follow() -> None:
                for _ in watching:
                    arrivals.append(time.time())
                    if len(arrivals) == count:
                        break

            follower = threading.Thread(target=follow)
            follower.start()
            delays = []
            for index in range(count):
                writer.stdin.write("\n")
                writer.stdin.flush()
                committed = float(writer.stdout.readline())
                deadline = time.monotonic() + 10
                while len(arrivals) <= index and time.monotonic() < deadline:
                    time.sleep(0.0005)
                if len(arrivals) <= index:
                    raise AssertionError(f"message {index} never arrived")
                delays.append(arrivals[index] - committed)
                time.sleep(0.02)  # paced, like people typing
            follower.join(10)
            writer.stdin.close()
            writer.wait(30)
        finally:
            db.close()
    return percentile(delays, 0.5), percentile(delays, 0.99)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embedding")
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--deliveries", type=int, default=200)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-embedding-") as directory:
        work = Path(directory)
        print("| room size | messages_after, pooled request | messages_after, kept "
              "connection | new_messages |")
        print("|---:|---:|---:|---:|")
        for size in sizes:
            path = work / f"{size}.fs"
            _build(path, size)
            medians = _readers(path, size, args.iterations)
            print(f"| {size:,} | {medians['pooled'] * 1e6:.0f} us | {medians['kept'] * 1e6:.0f} us"
                  f" | {medians['new_messages'] * 1e6:.0f} us |")
        p50, p99 = _delivery(work, args.deliveries)
        print(f"\nwatch delivery over ZEO, from the writer's commit returning to the watch "
              f"yielding it: p50 {ms(p50):.2f} ms, p99 {ms(p99):.2f} ms "
              f"({args.deliveries} messages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
