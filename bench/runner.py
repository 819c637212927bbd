"""`python -m bench`: runs every measurement in one process tree, prints the tables and
writes the report and the plot.

Options: ``--quick`` (smaller sizes, under a minute; CI's smoke test), ``--out FILE``
(markdown report), ``--plot FILE`` (PNG of delivery latencies). Exit status 1 if any
message was lost or duplicated, 2 if Redis is required (``CHATZEO_REQUIRE_REDIS=1``) but missing.

Everything runs in the main thread; the measured clients are child processes, and
the servers (ZEO, redis) are subprocesses started and stopped here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import append, delivery, history, idle, memory
from .report import Results, render_markdown, render_terminal, write_plot
from .services import RedisServer, ZeoServer

__all__ = ["main", "Settings", "SETTINGS"]


@dataclass(frozen=True)
class Settings:
    append_seconds: float
    writers: tuple[int, ...]
    messages: int
    sizes: tuple[int, ...]
    iterations: int
    seed_budget: float
    idle_seconds: float


SETTINGS = {
    "full": Settings(5.0, (1, 2, 4, 8), 300, (1_000, 100_000, 1_000_000), 200, 6.0, 10.0),
    "quick": Settings(2.0, (1, 2, 4, 8), 100, (1_000, 10_000), 50, 1.0, 5.0),
}


class Progress:
    """One status line on stderr, rewritten in place on a terminal."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, text: str) -> None:
        line = f"[bench {time.monotonic() - self.started:5.0f}s] {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--plot", type=Path, help="write the delivery latency plot (PNG) here")
    return parser.parse_args(argv)


def run(settings: Settings, work: Path, progress: Progress, results: Results) -> None:
    with ZeoServer(work / "zeo") as server:
        for writers in settings.writers:
            progress(f"append: {writers} writer(s) for {settings.append_seconds:g}s")
            assert server.process is not None
            results.append.append(append.measure(
                server.address, writers, settings.append_seconds, server.process.pid
            ))
        gaps = delivery.schedule(settings.messages)
        for system in ("chatzeo", "seed"):
            progress(f"delivery: {system}, {len(gaps)} messages")
            results.delivery.append(
                delivery.measure(system, server.address, f"delivery-{system}", gaps)
            )
    if RedisServer.available():
        for fsync, label in ((True, "redis (fsync always)"), (False, "redis (no persistence)")):
            progress(f"delivery: {label}, {len(gaps)} messages")
            with RedisServer(work / f"redis-{fsync}", fsync=fsync) as redis_server:
                results.delivery.append(
                    delivery.measure("redis", str(redis_server.port), "chat", gaps, label)
                )
    else:
        results.skipped.append(
            "redis-server is not installed: the Redis Streams comparison was skipped "
            "(apt-get install redis-server)"
        )
    store = work / "history"
    store.mkdir()
    sizes = list(settings.sizes)
    history.build(store / "chat.fs", sizes, progress)
    results.history = history.measure(
        store / "chat.fs", sizes, settings.iterations, settings.seed_budget, progress
    )
    with ZeoServer(store) as server:
        biggest = sizes[-1]
        for system in ("chatzeo", "seed"):
            progress(f"memory: {system} client opening {biggest:,} messages")
            results.memory.append(
                memory.measure(system, server.address, history.room_name(biggest), biggest, 600)
            )
        middle = sizes[len(sizes) // 2]
        progress(f"idle: push and polling clients for {settings.idle_seconds:g}s")
        results.idle = idle.measure(
            server.address, history.room_name(middle), middle, settings.idle_seconds
        )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    mode = "quick" if args.quick else "full"
    if os.environ.get("CHATZEO_REQUIRE_REDIS") == "1" and not RedisServer.available():
        print("CHATZEO_REQUIRE_REDIS=1 but redis-server is not installed", file=sys.stderr)
        return 2
    command = " ".join(["scripts/bench", *(argv if argv is not None else sys.argv[1:])])
    results = Results(mode=mode, command=command)
    progress = Progress()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chatzeo-bench-") as work:
        run(SETTINGS[mode], Path(work), progress, results)
    results.seconds = time.monotonic() - started
    progress("done")
    progress.done()
    if args.plot:
        write_plot(results, args.plot)
    if args.out:
        plot = os.path.relpath(args.plot, args.out.parent) if args.plot else None
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render_markdown(results, plot), encoding="utf-8")
    print(render_terminal(results))
    return 1 if results.lost_or_duplicated() else 0
