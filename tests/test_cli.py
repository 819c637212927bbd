"""The `chatzeo` command against a real server: scriptable commands and `serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ServerProcess, chatzeo_command, free_port, wait_until


def run(env, *args, input=None, timeout=60):
    return subprocess.run(
        chatzeo_command(*args), env=env, input=input, capture_output=True, timeout=timeout
    )


def test_send_then_history_rooms_and_json(cli_env):
    assert run(cli_env, "send", "--name", "alice", "hello there").returncode == 0
    assert run(cli_env, "send", "--name", "bob", "-", input=b"from stdin\n").returncode == 0
    history = run(cli_env, "history")
    assert history.returncode == 0
    lines = history.stdout.decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["<alice> hello there", "<bob> from stdin"]
    as_json = [json.loads(line) for line in run(cli_env, "history", "--json").stdout.splitlines()]
    assert [(m["author"], m["room"], m["text"]) for m in as_json] == [
        ("alice", "lobby", "hello there"),
        ("bob", "lobby", "from stdin"),
    ]
    assert all(isinstance(m["time"], float) and len(m["id"]) == 32 for m in as_json)
    assert run(cli_env, "history", "--limit", "1").stdout.decode().endswith("<bob> from stdin\n")
    assert run(cli_env, "rooms").stdout.decode() == "lobby\t2\n"


def test_tail_prints_each_new_message_as_it_arrives(cli_env, tmp_path):
    run(cli_env, "send", "--name", "alice", "before")
    out = open(tmp_path / "tail.out", "wb")
    tail = subprocess.Popen(
        chatzeo_command("tail", "--history", "1", "--json"), env=cli_env, stdout=out
    )
    try:
        def lines():
            return [json.loads(x) for x in (tmp_path / "tail.out").read_text().splitlines()]

        wait_until("history line", lambda: len(lines()) == 1)
        for index in range(3):
            assert run(cli_env, "send", "--name", "bob", f"live {index}").returncode == 0
            wait_until(f"live {index}", lambda i=index: len(lines()) == i + 2)
        assert [m["text"] for m in lines()] == ["before", "live 0", "live 1", "live 2"]
        tail.send_signal(signal.SIGINT)
        assert tail.wait(15) == 0
    finally:
        tail.kill()
        out.close()


def test_who_shows_a_connected_user_until_it_leaves(cli_env, server, tmp_path):
    ready = tmp_path / "ready"
    code = f"""
import sys, time
from chatzeo import ChatClient, open_db
client = ChatClient(open_db({server.address!r}), "carol")
client.join("den")
open({str(ready)!r}, "w").close()
sys.stdin.read()
client.close()
"""
    carol = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        wait_until("carol joined", ready.exists, timeout=30)
        assert run(cli_env, "who", "--room", "den").stdout == b"carol\n"
        assert run(cli_env, "who").stdout == b""
        carol.stdin.close()
        assert carol.wait(30) == 0
        assert run(cli_env, "who", "--room", "den").stdout == b""
    finally:
        carol.kill()


def test_errors_are_one_line_with_the_right_status(cli_env):
    cases = [
        (("send", "--room", "no spaces", "x"), 1, "invalid room name"),
        (("send", "--name", "x" * 40, "hi"), 1, "invalid user name"),
        (("send", "--server", "not an address", "hi"), 1, "invalid database target"),
        (("history", "--room", "nowhere"), 1, "no room named 'nowhere'"),
        (("history", "--limit", "-3"), 2, "expected a number >= 0"),
        (("frobnicate",), 2, "invalid choice"),
    ]
    for args, status, text in cases:
        result = run(cli_env, *args)
        err = result.stderr.decode()
        assert result.returncode == status, (args, err)
        assert text in err, (args, err)
        assert "Traceback" not in err
        if status == 1:
            assert err.count("\n") == 1, err
    assert run(cli_env, "history").stdout == b""


def test_unreachable_server_fails_within_the_wait_bound(cli_env):
    started = time.monotonic()
    result = run(cli_env, "send", "--server", f"127.0.0.1:{free_port()}", "--wait", "1", "hi")
    assert result.returncode == 1
    assert b"no chatzeo server answered" in result.stderr
    assert time.monotonic() - started < 30


def test_serve_stops_cleanly_and_refuses_a_taken_port_or_locked_storage(tmp_path):
    first = ServerProcess(tmp_path / "one").start()
    try:
        taken = subprocess.run(
            chatzeo_command(
                "serve", "--address", first.address, "--data-dir", str(tmp_path / "two")
            ),
            capture_output=True,
            timeout=60,
        )
        assert taken.returncode == 1
        assert b"is taken" in taken.stderr
        locked = subprocess.run(
            chatzeo_command(
                "serve", "--address", f"127.0.0.1:{free_port()}", "--data-dir", str(first.data_dir)
            ),
            capture_output=True,
            timeout=60,
        )
        assert locked.returncode == 1
        assert b"is locked" in locked.stderr
    finally:
        assert first.stop() == 0
    assert "stopped (SIGTERM)" in first.log.read_text()


def test_serve_sets_the_per_user_connection_limit(tmp_path):
    limited = ServerProcess(tmp_path / "limited", options=("--max-connections", "1")).start()
    try:
        env = {**os.environ, "CHATZEO_SERVER": limited.address}
        ready = tmp_path / "ready"
        code = f"""
import sys
from chatzeo import ChatClient, open_db
client = ChatClient(open_db({limited.address!r}), "dora")
open({str(ready)!r}, "w").close()
sys.stdin.read()
client.close()
"""
        dora = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
        try:
            wait_until("dora connected", ready.exists, timeout=30)
            second = run(env, "send", "--name", "dora", "a second connection")
            assert second.returncode == 1
            assert b"already has 1 live connections" in second.stderr
            assert run(env, "send", "--name", "eve", "someone else").returncode == 0
        finally:
            dora.stdin.close()
            dora.wait(30)
    finally:
        limited.stop()


def test_tail_keeps_going_across_a_server_crash(cli_env, server, tmp_path):
    out = open(tmp_path / "tail.out", "wb")
    tail = subprocess.Popen(chatzeo_command("tail"), env=cli_env, stdout=out)
    try:
        def texts():
            lines = (tmp_path / "tail.out").read_text().splitlines()
            return [line.split("> ", 1)[1] for line in lines]

        wait_until("tail joined", lambda: "lobby" in run(cli_env, "rooms").stdout.decode())
        assert run(cli_env, "send", "--name", "ann", "before the crash").returncode == 0
        wait_until("first line", lambda: texts() == ["before the crash"])
        server.kill()
        server.start()
        assert run(cli_env, "send", "--name", "ann", "after the restart").returncode == 0
        wait_until("second line", lambda: texts() == ["before the crash", "after the restart"])
        assert tail.poll() is None
    finally:
        tail.kill()
        tail.wait()
        out.close()


def test_history_and_tail_resume_after_a_key_and_unread_counts(cli_env, server, tmp_path):
    from chatzeo import ChatClient, open_db

    def as_alice(work):
        db = open_db(server.address, wait=30)
        try:
            alice = ChatClient(db, "alice")
            work(alice)
            alice.close()
        finally:
            db.close()

    def join(alice):
        alice.join("lobby", history=0, remember=True)
        alice.join("empty", history=0, remember=True)

    as_alice(join)  # before anything was said: all of it will be unread
    for index in range(4):
        assert run(cli_env, "send", "--name", "bob", f"m{index}").returncode == 0
    keys = [json.loads(x)["key"] for x in run(cli_env, "history", "--json").stdout.splitlines()]
    assert len(keys) == 4 and keys == sorted(keys)
    page = run(cli_env, "history", "--json", "--after", str(keys[0]), "--limit", "2")
    assert [json.loads(x)["text"] for x in page.stdout.splitlines()] == ["m1", "m2"]
    out = open(tmp_path / "tail.out", "wb")
    tail = subprocess.Popen(
        chatzeo_command("tail", "--json", "--after", str(keys[1])), env=cli_env, stdout=out
    )
    try:
        def texts():
            return [json.loads(x)["text"] for x in (tmp_path / "tail.out").read_text().splitlines()]

        wait_until("the messages after the key", lambda: texts() == ["m2", "m3"])
        assert run(cli_env, "send", "--name", "bob", "m4 @alice").returncode == 0
        wait_until("a live one after them", lambda: texts() == ["m2", "m3", "m4 @alice"])
        tail.send_signal(signal.SIGINT)
        assert tail.wait(15) == 0
    finally:
        tail.kill()
        out.close()

    # alice reads up to m2 (as her terminal would mark it) and leaves.
    as_alice(lambda alice: alice.mark_read("lobby", keys[2]))
    listed = run(cli_env, "unread", "--name", "alice", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(x) for x in listed.stdout.splitlines()]
    assert [(r["room"], r["unread"], r["mentions"], r["lost"]) for r in rows] == [
        ("lobby", 2, 1, 0),
        ("empty", 0, 0, 0),
    ]
    plain = run(cli_env, "unread", "--name", "alice").stdout.decode()
    assert plain.splitlines()[0] == "#lobby\t2 unread\t1 mentions"
    bad = run(cli_env, "unread", "--name", "no body")
    assert bad.returncode == 1 and bad.stderr.decode().count("\n") == 1
    assert run(cli_env, "history", "--after", "-3").returncode == 2
