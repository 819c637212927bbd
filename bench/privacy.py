"""What the read checks cost: load latency with `chatzeo serve`'s read guard on and off.

Two servers start with ``--tls auto`` (each its own CA; identities from `chatzeo
invite`), one with ``--private-rooms on`` (the read guard), one with ``off``. Both
hold the same public room of ``--messages`` messages; the guarded one also holds
``--private`` private rooms of a few messages each, so its index is not empty, and
the measuring user is a member of one of them. A client then times raw
``loadBefore`` round trips (``ClientStorage._call``: no client cache in the way)
for the public room's clock, session and message buckets, in blocks of ``--block``
loads alternating between the two servers so that a busy machine's drift meets
both alike, and on the guarded server also for the private room's objects (the
member's path). Prints p50/p99 per case and the ratios on/off.

``python -m bench.privacy [--rounds N] [--json FILE]``; runs in the main thread,
the servers are child processes stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from ZODB.utils import p64, u64

from chatzeo import open_db
from chatzeo.client import ChatClient
from chatzeo.testing import ServerProcess, percentile
from chatzeo.tls import load_identity

__all__ = ["main"]


@contextmanager
def _server(data: Path, private: str) -> Iterator[ServerProcess]:
    with ServerProcess(data, tls="auto", options=("--private-rooms", private)) as server:
        yield server


def _client(server: ServerProcess, name: str) -> ChatClient:
    out = server.invite(name, server.data_dir.parent / f"{server.data_dir.name}-{name}.chatzeo")
    identity = load_identity(out)
    return ChatClient(open_db(identity.server, ssl=identity.context, wait=30), identity.name)


def _objects(client: ChatClient) -> list[bytes]:
    room = client.room
    assert room is not None
    objects: list[Any] = [room, room._clock, room._messages, room.presence]
    bucket = room._messages._firstbucket
    while bucket is not None:
        objects.append(bucket)
        bucket = bucket._next
    return [obj._p_oid for obj in objects]


def _fill(client: ChatClient, room: str, messages: int) -> None:
    client.join(room)
    for number in range(messages):
        client.send(f"message {number}")


def _time_loads(client: ChatClient, oids: list[bytes], count: int) -> list[float]:
    storage = client.db.storage
    before = p64(u64(storage._call("lastTransaction")) + 1)
    timings = []
    for index in range(count):
        oid = oids[index % len(oids)]
        started = time.perf_counter()
        storage._call("loadBefore", oid, before)
        timings.append(time.perf_counter() - started)
    return timings


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "loads": len(values),
        "p50_us": percentile(values, 0.50) * 1e6,
        "p99_us": percentile(values, 0.99) * 1e6,
    }


def run(rounds: int, block: int, messages: int, private: int) -> dict[str, Any]:
    results: dict[str, list[float]] = {"public, checks off": [], "public, checks on": [],
                                       "private (member), checks on": []}
    with tempfile.TemporaryDirectory(prefix="chatzeo-bench-privacy-") as scratch, \
            ExitStack() as stack:
        base = Path(scratch)
        off_server = stack.enter_context(_server(base / "off", "off"))
        on_server = stack.enter_context(_server(base / "on", "on"))
        off = _client(off_server, "alice")
        on = _client(on_server, "alice")
        other = _client(on_server, "bob")
        for client in (off, on, other):
            stack.callback(client.db.close)
            stack.callback(client.close)
        _fill(off, "lobby", messages)
        _fill(on, "lobby", messages)
        public_off, public_on = _objects(off), _objects(on)
        for number in range(private):
            other.create_private(f"other-{number}")
            for line in range(3):
                other.send(f"line {line}")
        other.create_private("ours")
        other.invite("alice")
        for line in range(messages):
            other.send(f"private {line}")
        on.join("ours")
        private_on = _objects(on)
        for client, oids in ((off, public_off), (on, public_on), (on, private_on)):
            _time_loads(client, oids, 200)  # warm up: connections, OS caches
        for _ in range(rounds):
            results["public, checks off"] += _time_loads(off, public_off, block)
            results["public, checks on"] += _time_loads(on, public_on, block)
            results["private (member), checks on"] += _time_loads(on, private_on, block)
    summary = {case: _summary(values) for case, values in results.items()}
    base_case = summary["public, checks off"]
    for case in summary.values():
        case["p50_ratio"] = case["p50_us"] / base_case["p50_us"]
        case["p99_ratio"] = case["p99_us"] / base_case["p99_us"]
    return {"rounds": rounds, "block": block, "messages": messages,
            "private_rooms": private + 1, "cases": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=500)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--private", type=int, default=50, help="other private rooms")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    report = run(args.rounds, args.block, args.messages, args.private)
    print(f"load latency, raw loadBefore round trips over TLS ({args.rounds} rounds of "
          f"{args.block} per case, {report['private_rooms']} private rooms on the guarded "
          "server)")
    print(f"{'case':32} {'loads':>6} {'p50 us':>8} {'p99 us':>8} {'p50 x':>6} {'p99 x':>6}")
    for case, figures in report["cases"].items():
        print(f"{case:32} {figures['loads']:6d} {figures['p50_us']:8.1f} "
              f"{figures['p99_us']:8.1f} {figures['p50_ratio']:6.2f} {figures['p99_ratio']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
