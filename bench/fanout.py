"""Fan-out: what a post costs as readers and idle bystanders are added, chatzeo vs Redis.

``scripts/bench --fanout [--quick] [--out FILE] [--plot FILE]`` runs, in one run and
with the same shapes for both systems (chatzeo: `ChatClient` over `chatzeo serve`;
Redis Streams with ``appendfsync always``: ``XADD`` / ``XREAD BLOCK``):

delivery
    One writer posting paced 10-30 ms apart; N readers in the room, each its own
    connection, spread over `HOSTS` processes as threads; optionally B bystanders,
    connected and joined to rooms of their own, idle. Per post, the time until the
    *last* reader has it (stamped by the writer just before its write call), p50/p99.
    For chatzeo also the bytes a reader received and the requests it sent, per post.
throughput
    One writer posting back to back for a few seconds while I clients sit idle in
    other rooms: posts/s, the server process's CPU per post (``/proc``), send p50.

Bystanders count their feed wake-ups (chatzeo) so the report can show that an idle
client does not wake for other rooms' posts.

Threads: `main` runs in the benchmark's main thread; `_host` is the main thread of a
child process and starts one thread per simulated client.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatzeo.testing import ServerProcess, WireCounter, percentile

from .services import RedisServer
from .stats import ms

__all__ = ["main", "Shape", "DeliveryFigures", "ThroughputFigures", "SETTINGS"]

HOSTS = 4  # client processes per group, as in the measurement


@dataclass(frozen=True)
class Shape:
    readers: int
    bystanders: int

    @property
    def label(self) -> str:
        return f"{self.readers} readers" + (
            f" + {self.bystanders} bystanders" if self.bystanders else ""
        )


@dataclass(frozen=True)
class Settings:
    shapes: tuple[Shape, ...]
    messages: int
    idle: tuple[int, ...]
    seconds: float
    hosts: int = HOSTS


SETTINGS = {
    "full": Settings((Shape(10, 0), Shape(100, 0), Shape(100, 300)), 300, (0, 100, 400), 5.0),
    # CI's smoke test (tests/test_bench_smoke.py): every path, small, about 20 s.
    "quick": Settings((Shape(4, 0), Shape(12, 0), Shape(12, 24)), 30, (0, 24), 0.7, hosts=1),
}


@dataclass
class DeliveryFigures:
    system: str
    shape: Shape
    sent: int
    last_reader: list[float] = field(repr=False)  # seconds, per post every reader got
    complete: int = 0  # posts every reader received
    bytes_per_post: float = float("nan")  # per reader
    requests_per_post: float = float("nan")  # per reader
    bystander_wakeups: int = 0
    client_cpu_per_post: float = float("nan")  # seconds, per reader (its process's CPU)
    server_cpu_per_post: float = float("nan")  # seconds

    @property
    def p50(self) -> float:
        return percentile(self.last_reader, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.last_reader, 0.99)


@dataclass
class ThroughputFigures:
    system: str
    idle: int
    posts: int
    seconds: float
    cpu_seconds: float
    sends: list[float] = field(repr=False)

    @property
    def rate(self) -> float:
        return self.posts / self.seconds if self.seconds else float("nan")

    @property
    def cpu_per_post(self) -> float:
        return self.cpu_seconds / self.posts if self.posts else float("nan")


# -- child processes -------------------------------------------------------------


def _chatzeo_client(target: str, room: str) -> tuple[Any, Any]:
    from chatzeo.client import ChatClient
    from chatzeo.database import open_db

    db = open_db(target, wait=60)
    client = ChatClient(db)
    client.join(room, history=0)
    return db, client


def _reader_thread(system: str, target: str, room: str, count: int, ready: Any,
                   results: list[Any], stop: threading.Event) -> None:
    arrivals: dict[int, float] = {}
    if system == "chatzeo":
        db, client = _chatzeo_client(target, room)
        wire = WireCounter(db.storage)
        ready.put("ready")
        wire.bytes = wire.requests = 0
        while len(arrivals) < count and not stop.is_set():
            if client.wait(0.5):
                now = time.time()
                for message in client.receive():
                    index, sent = message.text.split()
                    if int(index) > 0:  # 0 is the writer's warm-up
                        arrivals.setdefault(int(index), now - float(sent))
        results.append((arrivals, wire.bytes, wire.requests))
        ready.put("done")
        client.close()
        db.close()
    else:
        import redis

        connection = redis.Redis(host="127.0.0.1", port=int(target))
        connection.ping()
        # Stream ids are milliseconds: everything added from now on is after this.
        last: Any = f"{int(time.time() * 1000) - 1}-0"
        ready.put("ready")
        while len(arrivals) < count and not stop.is_set():
            reply: Any = connection.xread({room: last}, block=500)
            now = time.time()
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    index, sent = fields[b"m"].decode().split()
                    if int(index) > 0:
                        arrivals.setdefault(int(index), now - float(sent))
        results.append((arrivals, 0, 0))
        ready.put("done")
        connection.close()


def _idle_thread(system: str, target: str, room: str, ready: Any, wakeups: list[int],
                 stop: threading.Event, clients: list[Any]) -> None:
    if system == "chatzeo":
        _db, client = _chatzeo_client(target, room)
        clients.append(client)
        ready.put("ready")
        while not stop.is_set():
            if client.wait(None) and not stop.is_set():
                wakeups.append(1)
                client.receive()
    else:
        import redis

        connection = redis.Redis(host="127.0.0.1", port=int(target))
        connection.ping()
        clients.append(connection)
        ready.put("ready")
        try:
            while not stop.is_set():
                connection.xread({room: "$"}, block=0)
                wakeups.append(1)
        except Exception:  # the connection closed under it at the end
            pass


def _host(role: str, system: str, target: str, room: str, threads: int, count: int,
          ready: Any, control: Any, out: Any) -> None:
    """One client process: ``threads`` readers of ``room`` or idle bystanders."""
    stop = threading.Event()
    results: list[Any] = []
    wakeups: list[int] = []
    clients: list[Any] = []
    workers = []
    local: Any = queue.Queue()  # this host's own "ready"s, to start its CPU clock
    forward = ready

    class _Relay:
        def put(self, item: Any) -> None:
            local.put(item)
            forward.put(item)

    ready = _Relay()
    for number in range(threads):
        if role == "reader":
            args: tuple[Any, ...] = (system, target, room, count, ready, results, stop)
            worker = threading.Thread(target=_reader_thread, args=args, daemon=True)
        else:
            args = (system, target, f"{room}-{number}", ready, wakeups, stop, clients)
            worker = threading.Thread(target=_idle_thread, args=args, daemon=True)
        worker.start()
        workers.append(worker)
    for _ in range(threads):
        local.get()  # every client of this host is ready: setup is over
    cpu = time.process_time()
    command = control.get()  # "stop" (readers also stop by themselves when complete)
    assert command == "stop"
    stop.set()
    if role == "reader":
        for worker in workers:
            worker.join(10)
        out.put(("reader", list(results), time.process_time() - cpu))
    else:
        out.put(("idle", len(wakeups), 0.0))
    out.close()
    out.join_thread()  # the answer is written before the hard exit below
    # 100 clients' orderly goodbyes would take longer than the measurement itself.
    os._exit(0)


class _Group:
    """``count`` clients of one role over `HOSTS` processes."""

    def __init__(self, role: str, system: str, target: str, room: str, count: int,
                 messages: int = 0, hosts: int = HOSTS) -> None:
        context = multiprocessing.get_context("spawn")
        self.ready = context.Queue()
        self.out = context.Queue()
        self.controls = []
        self.processes = []
        self.count = count
        hosts = min(hosts, count)
        shares = [count // hosts + (1 if host < count % hosts else 0) for host in range(hosts)]
        if system == "chatzeo":
            # Every room exists before its clients join: hundreds of clients creating
            # rooms at once would measure the rooms tree's bucket conflicts instead.
            names = [room] if role == "reader" else [
                f"{room}-h{host}-{number}"
                for host, share in enumerate(shares) for number in range(share)
            ]
            _create_rooms(target, names)
        for host, threads in enumerate(shares):
            control = context.Queue()
            process = context.Process(
                target=_host,
                args=(role, system, target, f"{room}-h{host}" if role == "idle" else room,
                      threads, messages, self.ready, control, self.out),
            )
            process.start()
            self.controls.append(control)
            self.processes.append(process)
        for _ in range(count):
            self.ready.get(timeout=300)

    def stop(self) -> list[Any]:
        for control in self.controls:
            control.put("stop")
        answers = [self.out.get(timeout=120) for _ in self.processes]
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()
        return answers


def _create_rooms(target: str, names: list[str]) -> None:
    from chatzeo.database import open_db
    from chatzeo.realm import get_root
    from chatzeo.retry import run_in_transaction

    db = open_db(target, wait=60)
    try:
        run_in_transaction(
            db, lambda connection: [get_root(connection).room(name) for name in names],
            what="creating the benchmark's rooms",
        )
    finally:
        db.close()


def _writer(system: str, target: str, room: str, gaps: list[float] | None, seconds: float,
            go: Any, out: Any) -> None:
    """Paced posts (``gaps``) or back to back for ``seconds``; returns send durations."""
    if system == "chatzeo":
        db, client = _chatzeo_client(target, room)
        write: Callable[[str], Any] = client.send
    else:
        import redis

        connection = redis.Redis(host="127.0.0.1", port=int(target))
        write = lambda text: connection.xadd(room, {"m": text})  # noqa: E731
    write("0 0")  # warm up: the first post creates things
    out.put("ready")
    go.wait(120)
    durations: list[float] = []
    started = time.monotonic()
    index = 0
    while True:
        if gaps is not None:
            if index >= len(gaps):
                break
            time.sleep(gaps[index])
        elif time.monotonic() - started >= seconds:
            break
        index += 1
        before = time.perf_counter()
        write(f"{index} {time.time():.6f}")
        durations.append(time.perf_counter() - before)
    out.put((durations, time.monotonic() - started))
    if system == "chatzeo":
        client.close()
        db.close()


def _run_writer(system: str, target: str, room: str, gaps: list[float] | None,
                seconds: float, server_pid: int) -> tuple[list[float], float, float]:
    context = multiprocessing.get_context("spawn")
    go, out = context.Event(), context.Queue()
    process = context.Process(target=_writer, args=(system, target, room, gaps, seconds, go, out))
    process.start()
    try:
        assert out.get(timeout=120) == "ready"
        cpu = _cpu(server_pid)
        go.set()
        durations, elapsed = out.get(timeout=seconds + 600)
        cpu = _cpu(server_pid) - cpu
    finally:
        process.join(60)
    return durations, elapsed, cpu


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the measurements ----------------------------------------------------------------


def _delivery(system: str, target: str, pid: int, shape: Shape, gaps: list[float],
              tag: str, hosts: int) -> DeliveryFigures:
    room = f"fanout-{tag}"
    bystanders = (
        _Group("idle", system, target, f"bystander-{tag}", shape.bystanders, hosts=hosts)
        if shape.bystanders else None
    )
    readers = _Group("reader", system, target, room, shape.readers, len(gaps), hosts)
    try:
        _, _, server_cpu = _run_writer(system, target, room, gaps, 0.0, pid)
        deadline = time.monotonic() + 30
        for _ in range(shape.readers):
            try:
                readers.ready.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
    finally:
        answers = readers.stop()
        woken = sum(count for _, count, _ in bystanders.stop()) if bystanders else 0
    per_reader = [entry for _, entries, _ in answers for entry in entries]
    figures = DeliveryFigures(system, shape, len(gaps), [], bystander_wakeups=woken)
    figures.server_cpu_per_post = server_cpu / len(gaps)
    figures.client_cpu_per_post = sum(cpu for _, _, cpu in answers) / (
        len(gaps) * max(1, len(per_reader))
    )
    for index in range(1, len(gaps) + 1):
        seen = [arrivals[index] for arrivals, _, _ in per_reader if index in arrivals]
        if len(seen) == len(per_reader) == shape.readers:
            figures.last_reader.append(max(seen))
            figures.complete += 1
    if system == "chatzeo" and per_reader:
        total = len(gaps) * len(per_reader)
        figures.bytes_per_post = sum(b for _, b, _ in per_reader) / total
        figures.requests_per_post = sum(r for _, _, r in per_reader) / total
    return figures


def _throughput(system: str, target: str, pid: int, idle: int, seconds: float,
                tag: str) -> ThroughputFigures:
    durations, elapsed, cpu = _run_writer(system, target, f"busy-{tag}", None, seconds, pid)
    return ThroughputFigures(system, idle, len(durations), elapsed, cpu, durations)


def run(settings: Settings, work: Path, progress: Callable[[str], None]) -> Results:
    results = Results(hosts=settings.hosts)
    rng = random.Random(14)
    gaps = [rng.uniform(0.010, 0.030) for _ in range(settings.messages)]
    systems: list[tuple[str, str, int]] = []
    with ServerProcess(work / "zeo") as zeo:
        assert zeo.process is not None
        systems.append(("chatzeo", zeo.address, zeo.process.pid))
        redis_server = None
        if RedisServer.available():
            redis_server = RedisServer(work / "redis", fsync=True).start()
            assert redis_server.process is not None
            systems.append(("redis", str(redis_server.port), redis_server.process.pid))
        else:
            results.skipped = "redis-server is not installed: Redis was not measured"
        try:
            for shape_index, shape in enumerate(settings.shapes):
                for system, target, pid in systems:
                    progress(f"delivery {system}: {shape.label}")
                    results.delivery.append(
                        _delivery(system, target, pid, shape, gaps, f"{shape_index}",
                                  settings.hosts)
                    )
            idle_groups: list[_Group] = []
            try:
                connected = 0
                for idle in sorted(settings.idle):
                    for system, target, _pid in systems:
                        if idle > connected:
                            progress(f"throughput: connecting {idle - connected} idle {system}")
                            idle_groups.append(
                                _Group("idle", system, target, f"idle-{idle}", idle - connected,
                                       hosts=settings.hosts)
                            )
                    connected = idle
                    for system, target, pid in systems:
                        progress(f"throughput {system}: {idle} idle clients")
                        results.throughput.append(
                            _throughput(system, target, pid, idle, settings.seconds, f"{idle}")
                        )
            finally:
                for group in idle_groups:
                    group.stop()
        finally:
            if redis_server is not None:
                redis_server.stop()
    return results


# -- report -------------------------------------------------------------------------


@dataclass
class Results:
    delivery: list[DeliveryFigures] = field(default_factory=list)
    throughput: list[ThroughputFigures] = field(default_factory=list)
    skipped: str = ""
    command: str = ""
    seconds: float = 0.0
    hosts: int = HOSTS

    def lost(self) -> bool:
        return any(figures.complete != figures.sent for figures in self.delivery)

    def _delivery(self, system: str, shape: Shape) -> DeliveryFigures | None:
        return next((f for f in self.delivery if f.system == system and f.shape == shape), None)

    def _throughput(self, system: str, idle: int) -> ThroughputFigures | None:
        return next((f for f in self.throughput if f.system == system and f.idle == idle), None)

    def ratios(self) -> list[tuple[str, float, str, bool]]:
        """(what, value, target, met) for the issue's four targets, where measurable."""
        rows: list[tuple[str, float, str, bool]] = []
        crowded = max((f.shape for f in self.delivery), key=lambda s: (s.bystanders, s.readers),
                      default=None)
        if crowded is not None:
            ours, theirs = self._delivery("chatzeo", crowded), self._delivery("redis", crowded)
            if ours and theirs:
                p50, p99 = ours.p50 / theirs.p50, ours.p99 / theirs.p99
                rows.append((f"delivery p50, {crowded.label}: chatzeo / Redis", p50, "<= 3",
                             p50 <= 3))
                rows.append((f"delivery p99, {crowded.label}: chatzeo / Redis", p99, "<= 5",
                             p99 <= 5))
        idles = sorted({f.idle for f in self.throughput})
        if len(idles) >= 2:
            none = self._throughput("chatzeo", idles[0])
            most = self._throughput("chatzeo", idles[-1])
            if none and most:
                cpu = most.cpu_per_post / none.cpu_per_post
                rate = most.rate / none.rate
                rows.append((f"server CPU per post, {idles[-1]} idle / {idles[0]} idle", cpu,
                             "<= 1.5", cpu <= 1.5))
                rows.append((f"one writer's posts/s, {idles[-1]} idle / {idles[0]} idle", rate,
                             ">= 0.7", rate >= 0.7))
        return rows

    def markdown(self, plot: str | None = None) -> str:
        lines = [
            "# Fan-out benchmark",
            "",
            f"`{self.command}` on {os.cpu_count()} cores, {self.seconds:.0f} s "
            f"(load average at the end {os.getloadavg()[0]:.1f}). chatzeo: `ChatClient` "
            "over `chatzeo serve`; Redis Streams with `appendfsync always`; every client "
            f"its own connection, over {self.hosts} process(es) per group.",
            "",
        ]
        if self.skipped:
            lines += [f"Note: {self.skipped}.", ""]
        lines += [
            "## Targets (ratios in this run)",
            "",
            "| ratio | value | target | met |",
            "|---|---|---|---|",
        ]
        for what, value, target, met in self.ratios():
            lines.append(f"| {what} | {value:.2f} | {target} | {'yes' if met else 'NO'} |")
        lines += [
            "",
            "## Delivery: paced posts (10-30 ms apart), time until the last reader has one",
            "",
            "| shape | system | p50 ms | p99 ms | complete | bytes / post / reader "
            "| requests / post / reader | bystander wake-ups | reader CPU / post ms "
            "| server CPU / post ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for f in self.delivery:
            extra = (
                f"{f.bytes_per_post:,.0f} | {f.requests_per_post:.2f}"
                if f.system == "chatzeo" else "- | -"
            )
            lines.append(
                f"| {f.shape.label} | {f.system} | {ms(f.p50):.1f} | {ms(f.p99):.1f} | "
                f"{f.complete}/{f.sent} | {extra} | {f.bystander_wakeups} | "
                f"{ms(f.client_cpu_per_post):.3f} | {ms(f.server_cpu_per_post):.3f} |"
            )
        lines += [
            "",
            "## Throughput: one writer back to back while clients idle in other rooms",
            "",
            "| idle clients | system | posts/s | server CPU / post ms | send p50 ms |",
            "|---|---|---|---|---|",
        ]
        for t in self.throughput:
            lines.append(
                f"| {t.idle} | {t.system} | {t.rate:,.0f} | {ms(t.cpu_per_post):.3f} | "
                f"{ms(percentile(t.sends, 0.5)):.2f} |"
            )
        if plot:
            lines += ["", f"![fan-out]({plot})"]
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        shapes = list(dict.fromkeys(f.shape for f in self.delivery))
        systems = sorted({f.system for f in self.delivery})
        width = 0.8 / max(1, 2 * len(systems))
        for s_index, system in enumerate(systems):
            for q_index, (name, pick) in enumerate((("p50", "p50"), ("p99", "p99"))):
                values = [
                    ms(getattr(self._delivery(system, shape), pick))
                    if self._delivery(system, shape) else 0.0
                    for shape in shapes
                ]
                offset = (2 * s_index + q_index) * width
                left.bar([i + offset for i in range(len(shapes))], values, width,
                         label=f"{system} {name}")
        left.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))],
                        [shape.label for shape in shapes], fontsize=8)
        left.set_ylabel("ms until the last reader has the post")
        left.set_yscale("log")
        left.legend(fontsize=8)
        left.set_title("delivery")
        for system in sorted({t.system for t in self.throughput}):
            rows = sorted((t for t in self.throughput if t.system == system), key=lambda t: t.idle)
            right.plot([t.idle for t in rows], [t.rate for t in rows], marker="o",
                       label=f"{system} posts/s")
        right.set_xlabel("idle clients in other rooms")
        right.set_ylabel("one writer's posts/s")
        twin = right.twinx()
        for system in sorted({t.system for t in self.throughput}):
            rows = sorted((t for t in self.throughput if t.system == system), key=lambda t: t.idle)
            twin.plot([t.idle for t in rows], [ms(t.cpu_per_post) for t in rows], marker="x",
                      linestyle="--", label=f"{system} server CPU ms/post")
        twin.set_ylabel("server CPU ms per post")
        right.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
        right.set_title("throughput")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench --fanout")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    if os.environ.get("CHATZEO_REQUIRE_REDIS") == "1" and not RedisServer.available():
        print("CHATZEO_REQUIRE_REDIS=1 but redis-server is not installed", file=sys.stderr)
        return 2
    started = time.monotonic()

    def progress(text: str) -> None:
        print(f"[fanout {time.monotonic() - started:5.0f}s] {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="chatzeo-fanout-") as work:
        results = run(SETTINGS["quick" if args.quick else "full"], Path(work), progress)
    results.command = " ".join(["scripts/bench --fanout", *argv])
    results.seconds = time.monotonic() - started
    plot = None
    if args.plot:
        results.plot(args.plot)
        plot = os.path.relpath(args.plot, args.out.parent) if args.out else str(args.plot)
    text = results.markdown(plot)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(text)
    return 1 if results.lost() else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
