"""One benchmark client process: ``python -m bench.postgres.worker ROLE JSON-ARGS``.

writer  post back to back (or paced) for ``seconds`` to ``rooms`` in turn, and write
        each post's latency and the times it started and returned, as JSON, to ``out``.
reader  follow one room with push delivery until ``expected`` messages arrived and
        write, per message id, the time it was read.

Times are ``time.monotonic()``, which on Linux is one clock for every process.
A worker touches ``out + '.ready'`` once connected and starts at ``start``'s creation.
Runs in the main thread only.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from chatzeo import ChatClient, open_db


def _ready_then_wait(out: Path, start: Path) -> None:
    Path(f"{out}.ready").touch()
    deadline = time.monotonic() + 120
    while not start.exists():
        if time.monotonic() > deadline:
            raise SystemExit("never told to start")
        time.sleep(0.002)


def writer(args: dict[str, Any]) -> None:
    db = open_db(args["target"])
    # Anonymous: no presence lease, so the only writes are the posts themselves.
    client = ChatClient(db)
    for room in args["rooms"]:
        client.join(room, history=0)
    client._manager.begin()
    sessions = [client._root().rooms[room] for room in args["rooms"]]
    out = Path(args["out"])
    _ready_then_wait(out, Path(args["start"]))
    pace = args.get("pace")
    limit = args.get("count") or 10**9
    end = time.monotonic() + args["seconds"]
    posts: list[tuple[str, float, float]] = []
    errors = 0
    index = 0
    while time.monotonic() < end and index < limit:
        session = sessions[index % len(sessions)]
        began = time.monotonic()
        try:
            message = session.add_message(f"{index}", args["name"])
        except Exception:
            errors += 1
            continue
        posts.append((message.id, began, time.monotonic()))
        index += 1
        if pace:
            time.sleep(random.uniform(*pace))
    out.write_text(json.dumps({"posts": posts, "errors": errors}))
    client.close()
    db.close()


def reader(args: dict[str, Any]) -> None:
    db = open_db(args["target"])
    client = ChatClient(db)
    client.join(args["room"], history=0)
    out = Path(args["out"])
    _ready_then_wait(out, Path(args["start"]))
    seen: dict[str, float] = {}
    deadline = time.monotonic() + args["seconds"]
    while len(seen) < args["expected"] and time.monotonic() < deadline:
        if client.wait(0.5):
            for message in client.receive():
                seen[message.id] = time.monotonic()
    out.write_text(json.dumps(seen))
    client.close()
    db.close()


if __name__ == "__main__":
    role, raw = sys.argv[1], sys.argv[2]
    {"writer": writer, "reader": reader}[role](json.loads(raw))
