"""Faults with real processes: the server killed with -9 under load, writers killed in the
middle of a commit, a send while the server is down, and `chatzeo check` on good and
damaged data files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from support import stored

from chatzeo import ChatClient, RetryLimitExceeded, RetryPolicy, get_root, open_db
from chatzeo.errors import StorageDamaged
from chatzeo.maintenance import check_file
from chatzeo.testing import ServerProcess, chatzeo_command, wait_until

WORKERS = Path(__file__).with_name("fault_workers.py")
pytestmark = pytest.mark.timeout(240)


def worker(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(WORKERS), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def lines(path: Path) -> list[str]:
    # A line is complete only once its newline is there (a writer may be killed mid-line).
    if not path.exists():
        return []
    text = path.read_text()
    return text.split("\n")[:-1]



def create_room(address: str, room: str) -> None:
    db = open_db(address, wait=30)
    try:
        client = ChatClient(db)
        client.join(room)
        client.close()
    finally:
        db.close()


def test_server_killed_during_a_burst_loses_nothing_acknowledged(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    writers: list[subprocess.Popen[bytes]] = []
    try:
        create_room(server.address, "burst")
        outs = [tmp_path / f"writer-{n}.ids" for n in range(4)]
        writers = [
            worker("writer", server.address, "burst", f"w{n}", "120", str(out))
            for n, out in enumerate(outs)
        ]

        def acknowledged() -> int:
            return sum(len(lines(out)) for out in outs)

        for _ in range(2):  # two crashes, each in the middle of the burst
            target = acknowledged() + 40
            wait_until("sends before the crash", lambda: acknowledged() >= target, 60)  # noqa: B023
            server.kill()
            server = ServerProcess(server.data_dir, port=server.port).start()
        for process in writers:
            _, err = process.communicate(timeout=180)
            assert process.returncode == 0, err.decode()[-2000:]
        ids = [line for out in outs for line in lines(out)]
        assert ids.count("done") == 4
        failed = [line for line in ids if line.startswith("failed")]
        assert not failed, failed  # every send got through, after reconnecting by itself
        acked = [line for line in ids if line != "done"]
        assert len(acked) == 4 * 120
        history = Counter(record[0] for _, record in stored(server.address, "burst"))
        assert all(history[message_id] == 1 for message_id in acked)
        # Nothing is stored that no writer asked for: ids are unique and all acknowledged.
        assert set(history) == set(acked) and sum(history.values()) == len(acked)
    finally:
        for process in writers:
            process.kill()
            process.wait()
        server.stop()
    check_file(server.data_dir / "chat.fs")


def test_writer_killed_mid_commit_leaves_no_partial_message(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    out = tmp_path / "batches.log"
    rng = random.Random(os.getpid())
    try:
        create_room(server.address, "big")
        kills = 0
        while kills < 8:
            process = worker("batcher", server.address, "big", str(out))
            try:
                started = len(lines(out))
                # Kill at a random moment just after it begins a commit: watch closely
                # for its "begin" line (wait_until's backoff would often miss the commit).
                deadline = time.monotonic() + 60
                while not (len(lines(out)) > started and lines(out)[-1].startswith("begin")):
                    assert time.monotonic() < deadline, "no commit begun within 60 s"
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.02))  # the random moment, not a wait for a state
            finally:
                process.send_signal(signal.SIGKILL)
                process.communicate(timeout=10)  # reaps it and closes its stderr pipe
            kills += 1
        log = lines(out)
        begun = {line.split()[1] for line in log if line.startswith("begin")}
        committed = {line.split()[1] for line in log if line.startswith("commit")}
        items = stored(server.address, "big")
        batches = Counter(record[2].split()[0] for _, record in items)
        for _key, record in items:
            message_id, author, text, kind = record
            assert isinstance(message_id, str) and author == "batcher" and kind == 0
            assert text.endswith("x" * 2000)
        print(f"{kills} kills, {len(begun - committed)} of them between begin and commit "
              f"({len((begun - committed) & set(batches))} of those landed), "
              f"{len(batches)} whole batches stored")
        # Whole batches or nothing, never a batch that no writer began.
        assert all(count == 300 for count in batches.values()), batches
        assert committed <= set(batches) <= begun
        # The server still serves: a plain send works.
        result = subprocess.run(
            chatzeo_command("send", "--server", server.address, "--room", "big", "still here"),
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert len(stored(server.address, "big")) == len(items) + 1
    finally:
        server.stop()
    check_file(server.data_dir / "chat.fs")


def test_send_while_the_server_is_down(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    server.stop()
    env = {**os.environ, "CHATZEO_SERVER": server.address}
    # 1. The server does not come back: a one-line error, exit 1, within the bound.
    started = time.monotonic()
    result = subprocess.run(
        chatzeo_command("send", "--wait", "2", "lost"), env=env, capture_output=True, timeout=60
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    error = result.stderr.decode()
    assert error.count("\n") == 1 and "Traceback" not in error
    assert f"nothing listens at {server.address} (waited 2s)" in error
    print(f"send with --wait 2 and no server: exit 1 after {elapsed:.2f}s")
    assert elapsed < 2 + 30  # a hang guard, not a timing assertion
    # 2. The server comes back within the bound: the send succeeds and is stored once.
    started = time.monotonic()
    sender = subprocess.Popen(
        chatzeo_command("send", "--wait", "60", "--room", "lobby", "patient"),
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        server = ServerProcess(server.data_dir, port=server.port).start()
        _, err = sender.communicate(timeout=90)
        print(f"send started while the server was down: exit {sender.returncode} "
              f"after {time.monotonic() - started:.2f}s")
        assert sender.returncode == 0, err
        texts = [record[2] for _, record in stored(server.address, "lobby")]
        assert texts == ["patient"]
    finally:
        sender.kill()
        sender.wait()
        server.stop()


def test_check_good_and_damaged_files(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    try:
        for number in range(30):
            db_send(server.address, f"message {number}")
    finally:
        server.stop()
    good = server.data_dir / "chat.fs"
    result = subprocess.run(chatzeo_command("check", str(good)), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert b"ok (" in result.stdout and b"30 messages" in result.stdout

    # Damaged framing: the first transaction's length field (after the 4-byte magic
    # and its 8-byte id) overwritten.
    framing = tmp_path / "framing.fs"
    data = bytearray(good.read_bytes())
    data[12:20] = b"\x00\x00\x00\x00\x00\x00\x00\x07"
    framing.write_bytes(bytes(data))
    assert_check_fails(framing, "broken file structure")

    # Truncated in the middle of a transaction.
    truncated = tmp_path / "truncated.fs"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 40])
    assert_check_fails(truncated, "broken file structure")

    # Well-framed, but chatzeo's invariants broken by a client that skipped them.
    invariants = tmp_path / "invariants.fs"
    invariants.write_bytes(good.read_bytes())
    db = open_db(f"file://{invariants}")
    try:
        with db.transaction() as connection:
            room = get_root(connection).rooms["lobby"]
            room._clock.count += 3
            room._messages[room._clock.head + 10] = ("id", None, 42, 0)
    finally:
        db.close()
    problems = assert_check_fails(invariants, "clock counts")
    assert "malformed" in problems and "below the largest key" in problems
    # The stray key also sits above the clock's pending entries and its flushed mark.
    assert "is not above the tree's" in problems and "flushed" in problems

    with pytest.raises(StorageDamaged) as damaged:
        check_file(invariants)
    assert len(damaged.value.problems) == 5


def db_send(address: str, text: str) -> None:
    db = open_db(address, wait=30)
    try:
        client = ChatClient(db, "alice")
        client.join("lobby", history=0)
        client.send(text)
        client.close()
    finally:
        db.close()


def assert_check_fails(path: Path, word: str) -> str:
    result = subprocess.run(chatzeo_command("check", str(path)), capture_output=True, timeout=60)
    error = result.stderr.decode()
    assert result.returncode == 1, (result.stdout, error)
    assert error.count("\n") == 1 and "Traceback" not in error and str(path) in error, error
    assert word in error
    return error


def test_a_connected_client_whose_server_dies_gives_up_within_its_bound(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    # While disconnected, each ZEO call waits up to ``wait`` for the server before it
    # raises; the retry budget is checked between attempts. So the bound is about
    # wait + max_seconds (`chatzeo --wait W` uses W for both).
    db = open_db(server.address, wait=3)
    try:
        client = ChatClient(db, "alice", policy=RetryPolicy(max_seconds=2.0))
        client.join("lobby", history=0)
        client.send("before")
        server.kill()
        started = time.monotonic()
        with pytest.raises(RetryLimitExceeded) as gave_up:
            client.send("while down")
        elapsed = time.monotonic() - started
        print(f"send on a connected client, server dead: gave up after {elapsed:.2f}s "
              f"({gave_up.value.attempts} attempts)")
        assert elapsed < 3 + 2 + 30  # a hang guard, not a timing assertion
        # The same client reconnects by itself once the server is back.
        server = ServerProcess(server.data_dir, port=server.port).start()
        client.policy = RetryPolicy(max_seconds=60.0)
        client.send("after")
        client.close()
    finally:
        db.close()
        server.stop()
    db = open_db(f"file://{server.data_dir / 'chat.fs'}")
    try:
        with db.transaction() as connection:
            texts = [m.text for m in get_root(connection).rooms["lobby"].history()]
    finally:
        db.close()
    assert texts == ["before", "after"]
