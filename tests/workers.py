"""Client processes for the invariant tests: ``python tests/workers.py ROLE ...``.

writer TARGET ROOM COUNT OFFSET OUT  post COUNT messages with a clock OFFSET seconds off,
                                     then write the ids add_message returned to OUT.
reader TARGET ROOM EXPECTED OUT      read live with push delivery until EXPECTED new
                                     messages arrived (or 60 s pass), dropping the cache
                                     between reads, then write the ids in order to OUT.
A writer waits for the file START (beside OUT) to exist, so all start together.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from chatzeo import ChatClient, open_db


def _wait_for_start(out: Path) -> None:
    start = out.parent / "START"
    deadline = time.monotonic() + 60
    while not start.exists():
        if time.monotonic() > deadline:
            raise SystemExit("never told to start")
        time.sleep(0.01)


def writer(target: str, room: str, count: int, offset: float, out: Path) -> None:
    db = open_db(target)
    client = ChatClient(db, clock=lambda: time.time() + offset)
    client.join(room, history=0)
    (out.parent / f"{out.name}.ready").touch()
    _wait_for_start(out)
    ids = [client.send(f"{out.name} {index}").id for index in range(count)]
    out.write_text("\n".join(ids))
    client.close()
    db.close()


def reader(target: str, room: str, expected: int, out: Path) -> None:
    db = open_db(target)
    client = ChatClient(db)
    client.join(room, history=0)
    (out.parent / f"{out.name}.ready").touch()
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while len(seen) < expected and time.monotonic() < deadline:
        if client.wait(1.0):
            seen.extend(message.id for message in client.receive())
            # Ghost everything: the cursor must survive it.
            client._connection.cacheMinimize()
    out.write_text("\n".join(seen))
    client.close()
    db.close()


if __name__ == "__main__":
    role, target, room, *rest = sys.argv[1:]
    if role == "writer":
        writer(target, room, int(rest[0]), float(rest[1]), Path(rest[2]))
    else:
        reader(target, room, int(rest[0]), Path(rest[1]))
