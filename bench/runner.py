"""`python -m bench`: runs every measurement in one process tree, prints the tables and
writes the report and the plot.

``--fanout`` runs `bench.fanout` instead (readers, bystanders and idle clients).
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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from chatzeo.testing import ServerProcess

from . import append, delivery, history, idle, memory
from .peers import PREFETCH_LABEL
from .report import Results, render_markdown, render_terminal, write_plot
from .services import RedisServer

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


DELIVERY_ROUNDS = 3


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


def _delivery(settings: Settings, work: Path, zeo: ServerProcess, progress: Progress,
              results: Results) -> None:
    """Every system in turn, in ``DELIVERY_ROUNDS`` rounds with the same slice of the
    schedule, so a noisy spell of the machine (or its disk) hits them all alike."""
    targets = [
        ("chatzeo", "chatzeo", zeo.address),
        (PREFETCH_LABEL, "chatzeo-prefetch", zeo.address),
        ("seed", "seed", zeo.address),
    ]
    with ExitStack() as servers:
        if RedisServer.available():
            for fsync, label in ((True, "redis (fsync always)"), (False, "redis (no persistence)")):
                redis = servers.enter_context(RedisServer(work / f"redis-{fsync}", fsync=fsync))
                targets.append((label, "redis", str(redis.port)))
        else:
            results.skipped.append(
                "redis-server is not installed: the Redis Streams comparison was skipped "
                "(apt-get install redis-server)"
            )
        gaps = delivery.schedule(settings.messages)
        size = -(-len(gaps) // DELIVERY_ROUNDS)
        merged = {label: delivery.DeliveryResult(label, 0, [], [], []) for label, _, _ in targets}
        for round_index in range(DELIVERY_ROUNDS):
            chunk = gaps[round_index * size:(round_index + 1) * size]
            for label, system, target in targets:
                progress(f"delivery round {round_index + 1}/{DELIVERY_ROUNDS}: {label}, "
                         f"{len(chunk)} messages")
                result = delivery.measure(system, target, f"delivery-{round_index}", chunk, label)
                total = merged[label]
                total.sent += result.sent
                total.latencies += result.latencies
                total.writes += result.writes
                total.after_write += result.after_write
        results.delivery.extend(merged.values())


def run(settings: Settings, work: Path, progress: Progress, results: Results) -> None:
    with ServerProcess(work / "zeo") as server:
        assert server.process is not None
        for writers in settings.writers:
            progress(f"append: {writers} writer(s) for {settings.append_seconds:g}s")
            results.append.append(append.measure(
                server.address, writers, settings.append_seconds, server.process.pid
            ))
        _delivery(settings, work, server, progress, results)
    store = work / "history"
    store.mkdir()
    sizes = list(settings.sizes)
    history.build(store / "chat.fs", sizes, progress)
    results.history = history.measure(
        store / "chat.fs", sizes, settings.iterations, settings.seed_budget, progress
    )
    with ServerProcess(store) as server:
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
    arguments = list(sys.argv[1:] if argv is None else argv)
    if "--fanout" in arguments:
        # The fan-out benchmark (bench.fanout) is a run of its own.
        from . import fanout

        arguments.remove("--fanout")
        return fanout.main(arguments)
    args = _parse(argv)
    mode = "quick" if args.quick else "full"
    if os.environ.get("CHATZEO_REQUIRE_REDIS") == "1" and not RedisServer.available():
        print("CHATZEO_REQUIRE_REDIS=1 but redis-server is not installed", file=sys.stderr)
        return 2
    command = " ".join(["scripts/bench", *(argv if argv is not None else sys.argv[1:])])
    results = Results(mode=mode, command=command, load=[os.getloadavg()[0]])
    progress = Progress()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chatzeo-bench-") as work:
        run(SETTINGS[mode], Path(work), progress, results)
    results.seconds = time.monotonic() - started
    results.load.append(os.getloadavg()[0])
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
