"""Writes tests/data/stop18.fs: a database as chatzeo wrote it before the layout of
chatzeo/server/ and chatzeo/terminal/ (commit d36c18d), for tests/test_old_database.py.

Run once, with that commit's code first on the path, and keep its output:

    git worktree add /tmp/old18 d36c18d
    PYTHONPATH=/tmp/old18 .venv/bin/python tests/data/write_stop18_database.py tests/data/stop18.fs

It holds every class chatzeo pickles: rooms (`ChatSession`, `RoomClock`, messages in
the tree and pending in the clock), the root (`ChatRoot`), users (`User`) with read
markers (`ReadMarkers`), a topic, presence leases, a private room and a direct
conversation (`PrivateRoom`).
"""

from __future__ import annotations

import sys

from BTrees.OOBTree import OOBTree

import chatzeo
from chatzeo import ChatClient, open_db, run_in_transaction
from chatzeo.realm import get_root

CLOCK = [1_764_590_400.0]  # 2025-12-01 12:00 UTC, then a second a message


def tick() -> float:
    CLOCK[0] += 1.0
    return CLOCK[0]


def main(path: str) -> None:
    where = chatzeo.__file__ or ""
    if "/old18/" not in where:
        raise SystemExit(f"run with the old code first on the path, not {where}")
    db = open_db(f"file://{path}")
    try:
        run_in_transaction(db, lambda c: setattr(get_root(c), "private", OOBTree()))
        db.storage._chatzeo_ssl = True  # as a TLS connection: private rooms may be made
        alice = ChatClient(db, "alice", clock=tick)
        bob = ChatClient(db, "bob", clock=tick)
        alice.join("lobby")
        bob.join("lobby")
        for n in range(150):  # enough for the older ones to be moved into the tree
            (alice if n % 2 else bob).send(f"lobby message {n}")
        alice.join("dev")
        alice.set_topic("releases and reviews")
        alice.send("the dev room's first message")
        alice.send("is waving", kind="action")
        read = [m.key for m in bob.receive()]
        bob.mark_read("lobby", read[-1] if read else bob.room.last_key())
        bob.flush_marks(force=True)
        alice.create_private("plans")
        alice.send("a private plan")
        alice.send_direct("bob", "a direct word")
        alice.close()
        bob.close()
    finally:
        db.close()


if __name__ == "__main__":
    main(sys.argv[1])
