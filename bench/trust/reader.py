"""The reading side of the trust benchmark: one process, one `ChatClient` as bob.

``python -m bench.trust.reader ADDRESS PKI_DIR ROOM`` (PKI_DIR empty without TLS) joins
ROOM and, for every
message whose text is ``<phase> <monotonic seconds>`` (posted by `bench.trust.run`),
records how long after that instant it was received; it prints ``ready`` once it
listens and, when the message ``stop`` arrives, one JSON object of latencies (seconds)
by phase. CLOCK_MONOTONIC is shared by all processes of the machine, so the writer's
instant and the reader's are comparable. Runs in its main thread only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from chatzeo import open_db
from chatzeo.client import ChatClient
from chatzeo.testing import Pki, client_context

__all__ = ["main"]


def main(argv: list[str]) -> int:
    address, pki_dir, room = argv
    ssl = None
    if pki_dir:  # empty: a server without TLS
        ssl = client_context(Pki(Path(pki_dir), Path(pki_dir) / "ca.pem"), "bob")
    db = open_db(address, wait=30, ssl=ssl)
    client = ChatClient(db, "bob")
    latencies: dict[str, list[float]] = {}
    try:
        client.join(room, history=0)
        print("ready", flush=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            client.wait(1.0)
            now = time.monotonic()
            for message in client.receive():
                if message.text == "stop":
                    print(json.dumps(latencies), flush=True)
                    return 0
                phase, _, sent = message.text.partition(" ")
                latencies.setdefault(phase, []).append(now - float(sent))
        return 1
    finally:
        client.close()
        db.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
