"""Client processes the fault tests start, kill and restart: ``python fault_workers.py ROLE ...``.

writer ADDRESS ROOM NAME COUNT OUT
    Sends COUNT messages through `ChatClient.send`, appending the id of each one whose
    send returned to OUT (one per line, flushed), or ``failed <error>`` when a send gave
    up; ``done`` at the end.
batcher ADDRESS ROOM OUT
    Commits batches of 300 messages of 2 KB each, one transaction per batch, for ever
    (the test kills it with -9); before each commit appends ``begin BATCH`` to OUT and
    after it ``commit BATCH``.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable

import transaction

from chatzeo import ChatClient, RetryPolicy, get_root, open_db
from chatzeo.errors import ChatError

BATCH_SIZE = 300
# Outlasts a server restart on a busy machine.
PATIENT = RetryPolicy(max_seconds=90.0)


def writer(address: str, room: str, name: str, count: str, out: str) -> None:
    db = open_db(address, wait=60)
    client = ChatClient(db, name, policy=PATIENT)
    client.join(room, history=0)
    with open(out, "a", buffering=1) as log:
        for number in range(int(count)):
            try:
                message = client.send(f"{name} {number}")
            except ChatError as error:
                log.write(f"failed {type(error).__name__}\n")
                continue
            log.write(f"{message.id}\n")
        log.write("done\n")
    client.close()
    db.close()


def batcher(address: str, room: str, out: str) -> None:
    db = open_db(address, wait=60)
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    with open(out, "a", buffering=1) as log:
        while True:
            manager.begin()
            session = get_root(connection).room(room)
            batch = uuid.uuid4().hex
            for number in range(BATCH_SIZE):
                session.post(f"{batch} {number} " + "x" * 2000, "batcher")
            log.write(f"begin {batch}\n")
            manager.commit()
            log.write(f"commit {batch}\n")


if __name__ == "__main__":
    roles: dict[str, Callable[..., None]] = {"writer": writer, "batcher": batcher}
    roles[sys.argv[1]](*sys.argv[2:])
