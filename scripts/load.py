"""Load run: many writer and reader processes on one room of a real `chatzeo serve`.

    python scripts/load.py [--seconds 60] [--writers 12] [--readers 8] [--json FILE]

Starts its own server on a free loopback port (in a temporary directory), starts the
readers (each follows the room live with `ChatClient.receive` and records the ids it
gets, in order), then the writers (each sends back to back until the time is up and
records the ids its sends returned, and how many retries and conflicts it met). The
``--seconds`` window opens once every writer has connected and joined (a `go` file
holds its end), so a loaded machine, where starting 12 processes can take longer
than the window, still measures that many seconds of all writers at once. While
they run it samples the server's resident memory (``VmRSS``) every second.

Then it checks, and exits 1 if any check fails:
- every writer sent (the window opened with all of them connected);
- nothing lost: every acknowledged id is stored;
- nothing duplicated: every stored id is stored once, and was acknowledged;
- one order for all: every reader's live sequence equals the stored history;
- `chatzeo check` passes on the data file after the server stopped.

It prints throughput, conflicts, retries, send latency and the RSS series.
The main process runs a sampler thread beside its main thread; every worker is a
process of its own (``--role``), single-threaded apart from ZEO's IO thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROOM = "load"
# How long the workers may take to connect before the window opens: a bound for a
# loaded machine, not a pause (the run starts as soon as all are ready).
SETUP_SECONDS = 180.0


# -- workers -------------------------------------------------------------------------


def opened_at(go: Path, give_up: float) -> float | None:
    """The end of the window once the run opened it (the `go` file), else None;
    exits if ``give_up`` (epoch seconds) passes first."""
    if time.time() > give_up:
        raise SystemExit(f"load: {go} did not appear in time")
    try:
        return float(go.read_text())
    except (OSError, ValueError):  # not there yet (it is renamed into place whole)
        return None


def writer(address: str, name: str, go: Path, out: Path) -> None:
    from ZODB.POSException import ConflictError

    from chatzeo import ChatClient, RetryPolicy, open_db
    from chatzeo.errors import ChatError

    counts = {"retries": 0, "conflicts": 0}

    def on_retry(error: BaseException) -> None:
        counts["retries"] += 1
        counts["conflicts"] += isinstance(error, ConflictError)

    db = open_db(address, wait=60)
    client = ChatClient(db, name, policy=RetryPolicy(max_seconds=60.0, on_retry=on_retry))
    client.join(ROOM, history=0)
    out.with_suffix(".ready").touch()
    give_up = time.time() + SETUP_SECONDS
    while (end := opened_at(go, give_up)) is None:
        time.sleep(0.01)
    acked: list[str] = []
    latencies: list[float] = []
    failed = 0
    number = 0
    while time.time() < end:
        started = time.perf_counter()
        try:
            message = client.send(f"{name} {number}")
        except ChatError:
            failed += 1
            continue
        latencies.append(time.perf_counter() - started)
        acked.append(message.id)
        number += 1
    last = time.time()  # the last send returned: closing is not part of the window
    client.close()
    db.close()
    out.write_text(json.dumps({"acked": acked, "latencies": latencies, "failed": failed,
                               "last": last, **counts}))


def reader(address: str, name: str, directory: Path, grace: float) -> None:
    from chatzeo import ChatClient, open_db

    db = open_db(address, wait=60)
    client = ChatClient(db)
    client.join(ROOM, history=0)
    (directory / f"{name}.ready").touch()
    expected_file = directory / "expected"
    seen: list[str] = []
    setup_ends = time.time() + SETUP_SECONDS
    end: float | None = None
    give_up = setup_ends + grace
    while time.time() < give_up:
        if end is None and (end := opened_at(directory / "go", setup_ends)) is not None:
            give_up = end + grace
        client.wait(0.5)
        seen.extend(message.id for message in client.receive())
        if expected_file.exists() and len(seen) >= int(expected_file.read_text()):
            break
    client.close()
    db.close()
    (directory / f"{name}.json").write_text(json.dumps(seen))


# -- the run -------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def stored_ids(address: str) -> list[str]:
    import transaction

    from chatzeo import get_root, open_db

    db = open_db(address, wait=30)
    try:
        manager = transaction.TransactionManager()
        connection = db.open(transaction_manager=manager)
        room = get_root(connection).rooms[ROOM]
        ids = [message.id for message in room.history()]
        assert room._clock.count == len(ids), "clock count differs from the stored messages"
        connection.close()
        return ids
    finally:
        db.close()


def spawn(role: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, *args], stderr=subprocess.PIPE
    )


def run(seconds: float, writers: int, readers: int, work: Path) -> dict[str, Any]:
    from chatzeo import ChatClient, open_db
    from chatzeo.maintenance import check_file
    from chatzeo.testing import ServerProcess, percentile, wait_until

    server = ServerProcess(work / "server")
    data_dir, address = server.data_dir, server.address
    processes: list[subprocess.Popen[bytes]] = []
    samples: list[tuple[float, int]] = []
    stop_sampling = threading.Event()
    try:
        server.start()
        db = open_db(address, wait=30)
        setup = ChatClient(db)
        setup.join(ROOM)
        setup.close()
        db.close()

        started = time.monotonic()

        def sample() -> None:
            while not stop_sampling.is_set():
                value = rss_kib(server.pid)
                if value is not None:
                    samples.append((time.monotonic() - started, value))
                stop_sampling.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        processes += [
            spawn("reader", address, f"reader-{n}", str(work), "120")
            for n in range(readers)
        ]
        wait_until("the readers", lambda: len(list(work.glob("reader-*.ready"))) == readers,
                   SETUP_SECONDS)
        spawned = time.monotonic()
        writer_procs = [
            spawn("writer", address, f"w{n}", str(work / "go"), str(work / f"writer-{n}.json"))
            for n in range(writers)
        ]
        processes += writer_procs

        def writers_ready() -> bool:
            for process in writer_procs:
                if process.poll() is not None:
                    raise SystemExit(f"load: a writer exited early: "
                                     f"{process.communicate()[1].decode()[-2000:]}")
            return len(list(work.glob("writer-*.ready"))) == writers

        wait_until("the writers", writers_ready, SETUP_SECONDS)
        ready_seconds = time.monotonic() - spawned
        opened = time.time()
        (work / "go.tmp").write_text(repr(opened + seconds))
        (work / "go.tmp").rename(work / "go")  # whole, so no worker reads half of it
        for process in writer_procs:
            _, err = process.communicate(timeout=seconds + 180)
            if process.returncode:
                raise SystemExit(f"load: a writer failed: {err.decode()[-2000:]}")
        stored = stored_ids(address)
        (work / "expected").write_text(str(len(stored)))
        for process in processes[:readers]:
            _, err = process.communicate(timeout=seconds + 180)
            if process.returncode:
                raise SystemExit(f"load: a reader failed: {err.decode()[-2000:]}")
        stop_sampling.set()
        sampler.join()
    finally:
        stop_sampling.set()
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        server.stop(timeout=30)
    check_problem = None
    try:
        check_file(data_dir / "chat.fs")
    except Exception as error:  # reported, and fails the run
        check_problem = str(error)

    results = [json.loads((work / f"writer-{n}.json").read_text()) for n in range(writers)]
    # From the opening of the window to the last send's return (past the window's end
    # by at most one send).
    write_seconds = max(r["last"] for r in results) - opened
    acked = [i for r in results for i in r["acked"]]
    latencies = sorted(x for r in results for x in r["latencies"])
    seen = [json.loads((work / f"reader-{n}.json").read_text()) for n in range(readers)]
    stored_set = set(stored)
    report = {
        "seconds": round(write_seconds, 2),
        "writers_ready_s": round(ready_seconds, 2),
        "writers": writers,
        "readers": readers,
        "messages": len(acked),
        "writers_that_sent": sum(1 for r in results if r["acked"]),
        "throughput_per_s": round(len(acked) / write_seconds, 1),
        "retries": sum(r["retries"] for r in results),
        "conflicts": sum(r["conflicts"] for r in results),
        "failed_sends": sum(r["failed"] for r in results),
        "send_p50_ms": round(percentile(latencies, 0.50) * 1000, 2) if latencies else None,
        "send_p99_ms": round(percentile(latencies, 0.99) * 1000, 2) if latencies else None,
        "lost": len(set(acked) - stored_set),
        "duplicated": len(stored) - len(stored_set),
        "unacknowledged_stored": len(stored_set - set(acked)),
        "readers_in_stored_order": sum(1 for s in seen if s == stored),
        "rss_kib": [value for _, value in samples],
        "check": check_problem or "ok",
    }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["writer", "reader"], help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--writers", type=int, default=12)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args, rest = parser.parse_known_args()
    if args.role == "writer":
        writer(rest[0], rest[1], Path(rest[2]), Path(rest[3]))
        return 0
    if args.role == "reader":
        reader(rest[0], rest[1], Path(rest[2]), float(rest[3]))
        return 0
    with tempfile.TemporaryDirectory(prefix="chatzeo-load-") as work:
        try:
            report = run(args.seconds, args.writers, args.readers, Path(work))
        except AssertionError as timed_out:  # wait_until's: one line, not a traceback
            raise SystemExit(f"load: {timed_out}") from None
    rss = report["rss_kib"]
    print(f"{report['messages']} messages in {report['seconds']}s from {args.writers} writers "
          f"({report['throughput_per_s']}/s), {args.readers} readers; the writers took "
          f"{report['writers_ready_s']}s to connect")
    print(f"retries {report['retries']} (conflicts {report['conflicts']}), failed sends "
          f"{report['failed_sends']}, send p50 {report['send_p50_ms']} ms "
          f"p99 {report['send_p99_ms']} ms")
    print(f"lost {report['lost']}, duplicated {report['duplicated']}, stored but not "
          f"acknowledged {report['unacknowledged_stored']}, readers in stored order "
          f"{report['readers_in_stored_order']}/{args.readers}, check {report['check']}")
    if rss:
        print(f"server RSS MiB (1/s): {' '.join(f'{v / 1024:.1f}' for v in rss)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    ok = (
        report["lost"] == 0
        and report["duplicated"] == 0
        and report["unacknowledged_stored"] == 0
        and report["failed_sends"] == 0
        and report["readers_in_stored_order"] == args.readers
        and report["check"] == "ok"
        and report["writers_that_sent"] == args.writers
    )
    print("load: OK" if ok else "load: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    # The chatzeo beside this script, installed or not (workers inherit it).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    sys.path.insert(0, str(REPO))
    sys.exit(main())
