"""Run the PostgreSQL-beside-ZEO measurements and print a Markdown table.

For each backend, in the same run and with the same pacing:

append      1, 4 and 8 writer processes posting back to back to one room for
            ``--seconds``: per-post latency p50/p99 (from before ``add_message`` to
            its return, retries included) and total posts per second.
delivery    one writer posting every 10-30 ms (uniform) and one reader process
            following the room by push: time from before the post to the reader
            having it, p50/p99, over ``--messages`` posts.
rooms       16 writer processes over 64 rooms (each writer takes 4 rooms in turn),
            back to back: the same figures as "append"; and, as the control, 16
            writer processes on one room.

ZEO is ``chatzeo serve`` with the repo's zeo.conf (FileStorage, fsync per commit);
PostgreSQL is a throwaway cluster (`chatzeo.testing.PostgresCluster`, fsync on, default
synchronous_commit) used directly by the clients through RelStorage, prepared by
`chatzeo.initdb.init_db`. Runs in the main thread; clients are processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chatzeo import ChatClient, open_db
from chatzeo.initdb import init_db
from chatzeo.testing import PostgresCluster, ServerProcess, percentile

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def zeo_backend(work: Path) -> Iterator[str]:
    with ServerProcess(work / "zeo") as server:
        yield server.address


@contextmanager
def postgres_backend(work: Path) -> Iterator[str]:
    cluster = PostgresCluster().start()
    try:
        uri = cluster.create_database("chat")
        init_db(uri)
        yield uri
    finally:
        cluster.close()


def _prepare_rooms(target: str, rooms: list[str]) -> None:
    client = ChatClient(open_db(target))
    try:
        for room in rooms:
            client.join(room, history=0)
    finally:
        client.close()
        client.db.close()


def _spawn(role: str, args: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.postgres.worker", role, json.dumps(args)],
        cwd=REPO, stderr=subprocess.PIPE,
    )


def _run_clients(work: Path, clients: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    start = work / f"START-{time.monotonic_ns()}"
    outs = []
    processes = []
    for index, (role, args) in enumerate(clients):
        out = work / f"{start.name}-{role}-{index}.json"
        outs.append(out)
        processes.append(_spawn(role, {**args, "out": str(out), "start": str(start)}))
    deadline = time.monotonic() + 120
    while not all(Path(f"{out}.ready").exists() for out in outs):
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read().decode()[-2000:])  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise RuntimeError("clients never got ready")
        time.sleep(0.01)
    start.touch()
    for process in processes:
        _, err = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(err.decode()[-2000:])
    return [json.loads(out.read_text()) for out in outs]


def _writes(results: list[dict[str, Any]]) -> dict[str, Any]:
    posts = [post for result in results for post in result["posts"]]
    latencies = [(returned - began) * 1000 for _, began, returned in posts]
    first = min(began for _, began, _ in posts)
    last = max(returned for _, _, returned in posts)
    return {
        "posts": len(posts),
        "errors": sum(result["errors"] for result in results),
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "per_s": len(posts) / (last - first),
    }


def append(target: str, work: Path, writers: int, seconds: float) -> dict[str, Any]:
    room = f"append{writers}"
    _prepare_rooms(target, [room])
    clients = [
        ("writer", {"target": target, "rooms": [room], "name": f"w{i}", "seconds": seconds})
        for i in range(writers)
    ]
    return _writes(_run_clients(work, clients))


def rooms(target: str, work: Path, writers: int, room_count: int, seconds: float) -> dict[str, Any]:
    names = [f"room{i:02d}" for i in range(room_count)]
    _prepare_rooms(target, names)
    per = room_count // writers
    clients = [
        ("writer", {"target": target, "rooms": names[i * per:(i + 1) * per],
                    "name": f"w{i}", "seconds": seconds})
        for i in range(writers)
    ]
    return _writes(_run_clients(work, clients))


def delivery(target: str, work: Path, messages: int) -> dict[str, Any]:
    room = "delivery"
    _prepare_rooms(target, [room])
    budget = messages * 0.05 + 60
    results = _run_clients(work, [
        ("reader", {"target": target, "room": room, "expected": messages, "seconds": budget}),
        ("writer", {"target": target, "rooms": [room], "name": "w", "seconds": budget,
                    "count": messages, "pace": [0.010, 0.030]}),
    ])
    seen, written = results[0], results[1]["posts"]
    from_post = [(seen[i] - began) * 1000 for i, began, _ in written if i in seen]
    from_commit = [(seen[i] - returned) * 1000 for i, _, returned in written if i in seen]
    return {
        "messages": len(written),
        "missed": len(written) - len(from_post),
        "p50_ms": percentile(from_post, 0.50),
        "p99_ms": percentile(from_post, 0.99),
        "after_commit_p50_ms": percentile(from_commit, 0.50),
        "after_commit_p99_ms": percentile(from_commit, 0.99),
        "commit_p50_ms": percentile([(r - b) * 1000 for _, b, r in written], 0.50),
    }


BACKENDS = {"ZEO (FileStorage)": zeo_backend, "PostgreSQL (RelStorage)": postgres_backend}


def measure(seconds: float, messages: int) -> dict[str, dict[str, Any]]:
    figures: dict[str, dict[str, Any]] = {}
    for name, backend in BACKENDS.items():
        with tempfile.TemporaryDirectory(prefix="bench.postgres-") as scratch:
            work = Path(scratch)
            with backend(work) as target:
                row: dict[str, Any] = {}
                for writers in (1, 4, 8):
                    row[f"append{writers}"] = append(target, work, writers, seconds)
                row["delivery"] = delivery(target, work, messages)
                row["rooms"] = rooms(target, work, 16, 64, seconds)
                row["one_room16"] = append(target, work, 16, seconds)
                figures[name] = row
    return figures


def table(figures: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| measurement | " + " | ".join(figures) + " |",
        "|---|" + "---|" * len(figures),
    ]

    def row(label: str, cell: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(f) for f in figures.values()) + " |")

    for writers in (1, 4, 8):
        key = f"append{writers}"
        row(f"append, {writers} writer process{'es' if writers > 1 else ''}, one room: "
            "p50 / p99 ms, posts/s",
            lambda f, k=key: f"{f[k]['p50_ms']:.1f} / {f[k]['p99_ms']:.1f}, "
                             f"{f[k]['per_s']:.0f}/s"
                             + (f" ({f[k]['errors']} gave up)" if f[k]["errors"] else ""))
    row("16 writer processes over 64 rooms: p50 / p99 ms, posts/s",
        lambda f: f"{f['rooms']['p50_ms']:.1f} / {f['rooms']['p99_ms']:.1f}, "
                  f"{f['rooms']['per_s']:.0f}/s"
                  + (f" ({f['rooms']['errors']} gave up)" if f["rooms"]["errors"] else ""))
    row("16 writer processes, one room (the control): p50 / p99 ms, posts/s",
        lambda f: f"{f['one_room16']['p50_ms']:.1f} / {f['one_room16']['p99_ms']:.1f}, "
                  f"{f['one_room16']['per_s']:.0f}/s"
                  + (f" ({f['one_room16']['errors']} gave up)"
                     if f["one_room16"]["errors"] else ""))
    row("delivery, post to other process, paced 10-30 ms: p50 / p99 ms",
        lambda f: f"{f['delivery']['p50_ms']:.2f} / {f['delivery']['p99_ms']:.2f}"
                  f" ({f['delivery']['messages']} msgs, {f['delivery']['missed']} missed)")
    row("  of which after the commit returned: p50 / p99 ms",
        lambda f: f"{f['delivery']['after_commit_p50_ms']:.2f} / "
                  f"{f['delivery']['after_commit_p99_ms']:.2f}")
    row("  paced commit alone: p50 ms",
        lambda f: f"{f['delivery']['commit_p50_ms']:.2f}")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-pg", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per write measurement")
    parser.add_argument("--messages", type=int, default=300, help="paced delivery posts")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    figures = measure(args.seconds, args.messages)
    print(f"machine: {machine()}")
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
