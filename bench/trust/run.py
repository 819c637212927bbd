"""What the commit checks cost: posting and delivery with them on and off, in the same run.

By default the two servers are what a local user runs: ``on`` is `chatzeo serve`
as it starts by default (loopback, no TLS: the record rules of `chatzeo.records`),
``off`` is plain ZEO (``runzeo``) over the same kind of FileStorage. With ``--tls``
they start from one throwaway CA (`chatzeo.testing.make_pki`): ``on`` is ``--guard on``
(record and identity rules), ``off`` is ``--guard off``. Against each, a reader
process (`bench.trust.reader`, as bob) waits for pushes while this process (alice)
posts with
`ChatSession.add_message`, the path `chatzeo send` takes: one commit per message.
Each round posts ``--burst`` messages back to back (commit latency, throughput) in
blocks of ``--block`` that alternate between the two servers, so drift of a busy
machine meets both alike, and then ``--paced`` messages ``--pace`` seconds apart,
alternating too (delivery latency of a quiet room); first to a plain room, then
to a room that keeps ``--cap`` messages (every post then also trims the oldest,
which the guard checks as retention). The servers' CPU seconds come from /proc.

Runs in the main thread; the servers and readers are child processes, all stopped
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import transaction

from chatzeo import open_db
from chatzeo.realm import get_root
from chatzeo.session import ChatSession
from chatzeo.testing import Pki, ServerProcess, client_context, make_pki, percentile

__all__ = ["main"]

MODES = ("on", "off")


@contextmanager
def _server(
    pki: Pki | None, data: Path, guard: str, off: str = "runzeo"
) -> Iterator[tuple[str, int]]:
    """``chatzeo serve --guard GUARD`` requiring ``pki``'s certificates, or without TLS:
    ``on`` is `chatzeo serve`'s default, ``off`` plain ``runzeo`` (or, with ``off``
    "guard-off", ``chatzeo serve --guard off``; with "protocol-off", both sides are
    ``chatzeo serve --guard off`` with ``--protocol-checks`` on and off)."""
    if pki is not None:
        server = ServerProcess(data, pki=pki, guard=guard)
    elif off == "protocol-off":
        # The protocol gate alone: both sides without record checks.
        server = ServerProcess(data, guard="off", options=("--protocol-checks", guard))
    elif guard == "on" or off == "guard-off":
        server = ServerProcess(data, guard="auto" if guard == "on" else "off")
    else:
        server = ServerProcess(data, runzeo=True)
    with server:
        yield server.address, server.pid


@contextmanager
def _reader(address: str, pki: Pki | None, room: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.trust.reader", address,
         str(pki.directory) if pki else "", room],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("reader did not start")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(5)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(values, 0.50) * 1000,
        "p90_ms": percentile(values, 0.90) * 1000,
        "p99_ms": percentile(values, 0.99) * 1000,
        "mean_ms": statistics.fmean(values) * 1000,
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    pki = make_pki(workdir / "pki") if args.tls else None
    rooms = ("plain", "capped")
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        servers = {
            m: stack.enter_context(_server(pki, workdir / m, m, args.off)) for m in MODES
        }
        dbs = {}
        sessions: dict[tuple[str, str], ChatSession] = {}
        for mode, (address, _) in servers.items():
            db = dbs[mode] = open_db(
                address, wait=30, ssl=client_context(pki, "alice") if pki else None
            )
            stack.callback(db.close)
            connection = db.open()
            root = get_root(connection)
            root.rooms["plain"] = ChatSession("plain")
            root.rooms["capped"] = ChatSession("capped", max_messages=args.cap)
            transaction.commit()
            for room in rooms:
                sessions[mode, room] = root.rooms[room]
        readers = {
            (mode, room): stack.enter_context(_reader(servers[mode][0], pki, room))
            for mode in MODES for room in rooms
        }
        commits: dict[tuple[str, str], list[float]] = {key: [] for key in sessions}
        burst_seconds: dict[tuple[str, str], float] = dict.fromkeys(sessions, 0.0)
        cpu = dict.fromkeys(MODES, 0.0)
        # Blocks of a few posts alternate between the servers, so whatever else the
        # machine does meets both alike.
        turn = 0
        for _ in range(args.rounds):
            for room in rooms:
                for _ in range(args.burst // args.block):
                    turn += 1
                    for mode in MODES if turn % 2 else MODES[::-1]:
                        session, pid = sessions[mode, room], servers[mode][1]
                        before_cpu = _cpu_seconds(pid)
                        started = time.perf_counter()
                        for _ in range(args.block):
                            t0 = time.perf_counter()
                            session.add_message(f"burst {time.monotonic()!r}", "alice")
                            commits[mode, room].append(time.perf_counter() - t0)
                        burst_seconds[mode, room] += time.perf_counter() - started
                        cpu[mode] += _cpu_seconds(pid) - before_cpu
                for _ in range(args.paced):
                    turn += 1
                    for mode in MODES if turn % 2 else MODES[::-1]:
                        session, pid = sessions[mode, room], servers[mode][1]
                        before_cpu = _cpu_seconds(pid)
                        sessions[mode, room].add_message(f"paced {time.monotonic()!r}", "alice")
                        cpu[mode] += _cpu_seconds(pid) - before_cpu
                        time.sleep(args.pace)
        for session in sessions.values():
            session.add_message("stop", "alice")
        delivered = {}
        for key, process in readers.items():
            output, _ = process.communicate(timeout=60)
            delivered[key] = json.loads(output.strip().splitlines()[-1])
        posts_per_mode = args.rounds * len(rooms) * (
            args.burst // args.block * args.block + args.paced
        )
        for mode, room in sessions:
            results[f"{mode}/{room}"] = {
                "commit": _summary(commits[mode, room]),
                "throughput_per_s": len(commits[mode, room]) / burst_seconds[mode, room],
                "delivery_burst": _summary(delivered[mode, room]["burst"]),
                "delivery_paced": _summary(delivered[mode, room]["paced"]),
            }
        for mode in MODES:
            results[f"{mode}/server_cpu_ms_per_post"] = cpu[mode] / posts_per_mode * 1000
    return results


def _report(results: dict[str, Any], tls: bool, off: str = "plain runzeo") -> str:
    lines = [
        "checks on: " + ("chatzeo serve --guard on (TLS)" if tls else "chatzeo serve (default)")
        + "; off: " + ("chatzeo serve --guard off (TLS)" if tls else off),
        f"{'':16} {'commit p50':>10} {'p99':>7} {'posts/s':>8} "
        f"{'deliv p50':>10} {'p99':>7} {'paced p50':>10} {'p99':>7}   (ms)"
    ]
    for room in ("plain", "capped"):
        for mode in MODES:
            row = results[f"{mode}/{room}"]
            lines.append(
                f"{room + ' checks ' + mode:16} {row['commit']['p50_ms']:10.2f} "
                f"{row['commit']['p99_ms']:7.2f} {row['throughput_per_s']:8.0f} "
                f"{row['delivery_burst']['p50_ms']:10.2f} {row['delivery_burst']['p99_ms']:7.2f} "
                f"{row['delivery_paced']['p50_ms']:10.2f} {row['delivery_paced']['p99_ms']:7.2f}"
            )
        on, base = results[f"on/{room}"], results[f"off/{room}"]
        lines.append(
            f"{room + ' on/off':16} {on['commit']['p50_ms'] / base['commit']['p50_ms']:10.2f} "
            f"{on['commit']['p99_ms'] / base['commit']['p99_ms']:7.2f} "
            f"{on['throughput_per_s'] / base['throughput_per_s']:8.2f} "
            f"{on['delivery_burst']['p50_ms'] / base['delivery_burst']['p50_ms']:10.2f} "
            f"{'':7} {on['delivery_paced']['p50_ms'] / base['delivery_paced']['p50_ms']:10.2f}"
        )
    lines.append(
        "server CPU per post: checks on {:.3f} ms, off {:.3f} ms".format(
            results["on/server_cpu_ms_per_post"], results["off/server_cpu_ms_per_post"]
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-trust", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--burst", type=int, default=300, help="back-to-back posts a round")
    parser.add_argument("--block", type=int, default=25, help="posts before switching server")
    parser.add_argument("--paced", type=int, default=50, help="paced posts a round")
    parser.add_argument("--pace", type=float, default=0.01, help="seconds between paced posts")
    parser.add_argument("--cap", type=int, default=100, help="max_messages of the capped room")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--off", choices=("runzeo", "guard-off", "protocol-off"), default="runzeo",
                        help="without --tls, what 'off' runs (default: plain runzeo)")
    parser.add_argument("--tls", action="store_true",
                        help="compare --guard on and off with client certificates instead")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-trust-") as workdir:
        results = run(args, Path(workdir))
    off = {
        "runzeo": "plain runzeo",
        "guard-off": "chatzeo serve --guard off",
        "protocol-off": "serve --guard off --protocol-checks off (on: protocol checks only)",
    }[args.off]
    print(_report(results, args.tls, off))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
