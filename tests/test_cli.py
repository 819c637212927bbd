"""The `chatzeo` command against a real server: scriptable commands and `serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from chatzeo.testing import ServerProcess, chatzeo_command, free_port, wait_until


def run(
    env: dict[str, str], *args: str, input: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
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

            def grew(count: int = index + 2) -> bool:
                return len(lines()) == count

            wait_until(f"live {index}", grew)
        assert [m["text"] for m in lines()] == ["before", "live 0", "live 1", "live 2"]
        tail.send_signal(signal.SIGINT)
        assert tail.wait(15) == 0
    finally:
        tail.kill()
        out.close()


def test_tail_can_wait_for_a_room_to_appear(cli_env, tmp_path):
    out, err = open(tmp_path / "tail.out", "wb"), open(tmp_path / "tail.err", "wb")
    tail = subprocess.Popen(
        chatzeo_command("tail", "--room", "later", "--wait-for-room"),
        env=cli_env, stdout=out, stderr=err,
    )
    try:
        wait_until("the notice", lambda: b"waiting for it" in (tmp_path / "tail.err").read_bytes())
        assert "later" not in run(cli_env, "rooms").stdout.decode()  # waiting created nothing
        for text in ("first", "second"):
            assert run(cli_env, "send", "--room", "later", text).returncode == 0
        wait_until("both lines", lambda: (tmp_path / "tail.out").read_text().count("\n") == 2)
        lines = (tmp_path / "tail.out").read_text().splitlines()
        assert [line.split("> ", 1)[1] for line in lines] == ["first", "second"]
        assert (tmp_path / "tail.err").read_text() == (
            "chatzeo: no room named 'later' yet; waiting for it\n"
        )
    finally:
        tail.kill()
        tail.wait()
        out.close()
        err.close()


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
        assert carol.stdin is not None
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


def test_unreachable_server_says_why_within_the_wait_bound(cli_env):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run(cli_env, "send", "--server", address, "--wait", "1", "hi")
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.decode() == f"chatzeo: error: nothing listens at {address} (waited 1s)\n"
    assert elapsed < 30
    # A name that does not resolve is said at once: waiting would not mend it.
    started = time.monotonic()
    result = run(cli_env, "history", "--server", "no-such-host.invalid:8765", "--wait", "60")
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "chatzeo: error: cannot reach no-such-host.invalid:8765: "
        "host 'no-such-host.invalid' not found\n"
    )
    assert time.monotonic() - started < 30  # far less than the 60 s wait


def test_a_server_that_is_starting_is_still_waited_for(cli_env, tmp_path):
    port = free_port()
    late = ServerProcess(tmp_path / "late", port=port)
    sender = subprocess.Popen(
        chatzeo_command("send", "--server", late.address, "--wait", "60", "made it"),
        env=cli_env, stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)  # the sender is now probing a port where nothing listens
        assert sender.poll() is None
        late.start()
        assert sender.wait(60) == 0, sender.stderr.read() if sender.stderr else ""
        history = run({**cli_env, "CHATZEO_SERVER": late.address}, "history")
        assert history.stdout.decode().endswith("made it\n")
        # The probe ends with ZEO's own `ruok`, so the server logs no error for it.
        assert "Error" not in late.log.read_text(), late.log.read_text()
    finally:
        sender.kill()
        sender.communicate(timeout=30)  # reaps it and closes its stderr pipe
        late.stop()


def test_mistakes_are_one_line_errors_not_tracebacks(cli_env, server, tmp_path):
    not_fs = tmp_path / "notes.txt"
    not_fs.write_text("just some text\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    fs = server.data_dir / "chat.fs"
    cases = [
        (("history", "--server", "file:///nonexistent/dir/x.fs"), 1,
         "no such directory or file"),
        (("history", "--server", f"file://{fs}"), 1, "is locked: a server"),
        (("pack", "--days", "nan"), 2, "expected a number of days from 0"),
        (("pack", "--days", "1e300"), 2, "expected a number of days from 0"),
        (("pack", "--days", "-1"), 2, "expected a number of days from 0"),
        (("send", "--wait", "nan", "x"), 2, "expected a number of seconds from 0"),
        (("send", "--wait", "-5", "x"), 2, "expected a number of seconds from 0"),
        (("send", "--wait", "inf", "x"), 2, "expected a number of seconds from 0"),
        (("serve", "--data-dir", str(a_file)), 1, "is a file; it must be a directory"),
        (("check", str(tmp_path)), 1, "is a directory; give the data file"),
        (("check", "/dev/null"), 1, "is not a regular file"),
        (("check", str(not_fs)), 1, "is not a FileStorage data file"),
        (("check", str(tmp_path / "missing.fs")), 1, "no such file"),
        (("send", "hi", "there"), 2, "quote it, e.g. chatzeo send 'hi there'"),
        (("who", "--room", "typo"), 1, "no room named 'typo'"),
        (("tail", "--room", "typo"), 1, "no room named 'typo'"),
    ]
    for args, status, text in cases:
        result = run(cli_env, *args)
        err = result.stderr.decode()
        assert result.returncode == status, (args, err)
        assert text in err, (args, err)
        assert "Traceback" not in err and err.count("\n") == 1, (args, err)
    # Reading commands created nothing.
    assert "typo" not in run(cli_env, "rooms").stdout.decode()


def test_send_fails_in_one_line_when_the_server_cannot_write(cli_env, tmp_path):
    # RLIMIT_FSIZE stands in for a full disk: the server's writes past 256 KiB fail
    # (Python ignores SIGXFSZ, so write() raises EFBIG as it would raise ENOSPC).
    import resource

    limit = 256 * 1024
    small = ServerProcess(tmp_path / "small")
    original = subprocess.Popen

    def limited(*args, **kwargs):
        kwargs["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", limited)
        small.start()
    env = {**cli_env, "CHATZEO_SERVER": small.address}
    try:
        text = "x" * 4000
        for attempt in range(200):  # 200 x 4 KB is far past the limit
            result = run(env, "send", "--name", "alice", f"{attempt} {text}")
            if result.returncode != 0:
                break
        else:
            raise AssertionError("every send succeeded past the file size limit")
        err = result.stderr.decode()
        assert result.returncode == 1 and "Traceback" not in err and err.count("\n") == 1, err
        assert "chatzeo: error:" in err and "File too large" in err, err
        # Nothing half-written: what was acknowledged is there, the refused one is not.
        history = run(env, "history", "--limit", "1000", "--json")
        texts = [json.loads(line)["text"] for line in history.stdout.splitlines()]
        assert texts == [f"{i} {text}" for i in range(attempt)]
    finally:
        small.stop()


def test_cli_polish_version_json_and_room_case(cli_env, server, tmp_path):
    version = run(cli_env, "--version")
    assert version.returncode == 0 and version.stdout.decode().startswith("chatzeo 0.")
    assert run(cli_env, "send", "--room", "dev", "--name", "alice", "hi").returncode == 0
    # Room names match without regard to case, and show the stored spelling.
    assert run(cli_env, "send", "--room", "DEV", "--name", "bob", "yo").returncode == 0
    rooms = [json.loads(line) for line in run(cli_env, "rooms", "--json").stdout.splitlines()]
    assert rooms == [{"room": "dev", "messages": 2}]
    history = run(cli_env, "history", "--room", "Dev", "--json")
    assert [json.loads(line)["room"] for line in history.stdout.splitlines()] == ["dev", "dev"]
    who = run(cli_env, "who", "--room", "Dev", "--json")
    assert json.loads(who.stdout) == {"room": "dev", "present": []}
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
            assert dora.stdin is not None
            dora.stdin.close()
            dora.wait(30)
    finally:
        limited.stop()


def test_tail_keeps_going_across_a_server_crash(cli_env, server, tmp_path):
    assert run(cli_env, "send", "--name", "ann", "before the crash").returncode == 0
    out = open(tmp_path / "tail.out", "wb")
    tail = subprocess.Popen(chatzeo_command("tail", "--history", "1"), env=cli_env, stdout=out)
    try:
        def texts():
            lines = (tmp_path / "tail.out").read_text().splitlines()
            return [line.split("> ", 1)[1] for line in lines]

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
    for bad_name, says in (("no body", "user name"), ("nobody", "no user named 'nobody'")):
        bad = run(cli_env, "unread", "--name", bad_name)
        assert bad.returncode == 1 and bad.stderr.decode().count("\n") == 1
        assert says in bad.stderr.decode()
    assert run(cli_env, "history", "--after", "-3").returncode == 2


def test_the_default_name_is_the_login_name_made_valid(cli_env):
    env = {key: value for key, value in cli_env.items() if key != "CHATZEO_NAME"}
    for login, shown in (("dora", "dora"), ("John Doe", "JohnDoe"), ("!!!", "guest")):
        env.update(LOGNAME=login, USER=login)
        assert run(env, "send", f"from {login}").returncode == 0
        history = run(env, "history", "--limit", "1", "--json")
        assert json.loads(history.stdout)["author"] == shown
