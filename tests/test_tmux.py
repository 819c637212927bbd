"""`chatzeo chat` end to end in a real terminal: tmux panes running real client
processes against a real server, read back with ``capture-pane``.

Without tmux these tests skip, or fail when ``CHATZEO_REQUIRE_TMUX=1`` (CI sets it).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile import post_unchecked
from support import REPO

from chatzeo.client import ChatClient
from chatzeo.database import open_db
from chatzeo.testing import ServerProcess, free_port, require, wait_until

pytestmark = pytest.mark.tmux

WIDTH, HEIGHT = 120, 40
EXITED = "chat exited with status"


class Pane:
    """One tmux session running one command in a 120x40 terminal."""

    def __init__(self, tmux: Tmux, name: str) -> None:
        self.tmux = tmux
        self.name = name

    def type(self, text: str) -> None:
        """Type ``text`` literally, without Enter."""
        self.tmux.run("send-keys", "-t", self.name, "-l", text)

    def enter(self, text: str = "") -> None:
        if text:
            self.type(text)
        self.tmux.run("send-keys", "-t", self.name, "Enter")

    def key(self, key: str) -> None:
        self.tmux.run("send-keys", "-t", self.name, key)

    def screen(self, escapes: bool = False) -> str:
        """The visible screen and up to 200 lines of scrollback, wrapped lines joined."""
        flags = ["-e"] if escapes else []
        return self.tmux.run("capture-pane", "-p", "-J", "-S", "-200", *flags, "-t", self.name)

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen().splitlines() if line.strip()]

    def wait_for(self, *texts: str, timeout: float = 20.0) -> str:
        """Wait until the screen shows every one of ``texts``; return the screen."""
        def shows_all() -> str | None:
            screen = self.screen()
            return screen if all(text in screen for text in texts) else None

        try:
            return wait_until(f"{texts} in pane {self.name}", shows_all, timeout)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- pane {self.name} ---\n{self.screen()}") from None

    def wait_gone(self, text: str, timeout: float = 20.0) -> None:
        label = f"{text!r} gone from {self.name}"
        try:
            wait_until(label, lambda: text not in self.screen(), timeout)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- pane {self.name} ---\n{self.screen()}") from None

    def title(self) -> str:
        return self.tmux.run("display-message", "-p", "-t", self.name, "#{pane_title}")


class Tmux:
    """A private tmux server (its own socket), killed by the fixture."""

    def __init__(self, socket: str, env: dict[str, str]) -> None:
        self.socket = socket
        self.env = env

    def run(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=15,
            env=self.env,
        )
        if done.returncode != 0:
            raise AssertionError(f"tmux {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def open(self, name: str, argv: list[str], env: dict[str, str]) -> Pane:
        """Start ``argv`` in a new session; when it exits the pane says how, and stays."""
        assignments = [f"{key}={value}" for key, value in env.items()]
        command = (
            f"{shlex.join(['env', *assignments, *argv])}; "
            f'echo "{EXITED} $?"; exec sleep 600'
        )
        self.run(
            "new-session", "-d", "-s", name, "-x", str(WIDTH), "-y", str(HEIGHT), command
        )
        return Pane(self, name)

    def kill(self) -> None:
        """Kill the server and remove its socket file (tmux leaves it behind)."""
        where = subprocess.run(
            ["tmux", "-L", self.socket, "display-message", "-p", "#{socket_path}"],
            capture_output=True, text=True, timeout=15, env=self.env,
        ).stdout.strip()
        subprocess.run(
            ["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=15
        )
        if where:
            Path(where).unlink(missing_ok=True)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    require("tmux", None if shutil.which("tmux") else "tmux is not installed")
    env = {key: value for key, value in os.environ.items() if not key.startswith("TMUX")}
    server = Tmux(f"chatzeo-test-{uuid.uuid4().hex[:12]}", env)
    try:
        yield server
    finally:
        server.kill()


def client_env(tmp_path: Path) -> dict[str, str]:
    return {
        "TERM": "xterm-256color",
        "PYTHONPATH": str(REPO),
        "CHATZEO_DATA": str(tmp_path / "client-data"),
    }


def start_chat(tmux: Tmux, server: ServerProcess, tmp_path: Path, name: str, *extra: str) -> Pane:
    argv = [sys.executable, "-m", "chatzeo", "chat", "--server", server.address, "--name", name]
    pane = tmux.open(name, [*argv, *extra], client_env(tmp_path))
    pane.wait_for("[#", f"{name}>", "connected")
    return pane


def prompt_line(pane: Pane) -> str:
    """The line being typed: the last ``[#room] name>`` line on screen ("" while
    none is drawn, in the middle of a redraw)."""
    lines = [line for line in pane.lines() if re.match(r"\[#\S+\] \S+>", line)]
    return lines[-1] if lines else ""


def test_two_users_talk_while_one_is_typing(
    tmux: Tmux, server: ServerProcess, tmp_path: Path
) -> None:
    db = open_db(server.address, wait=5)
    writer = ChatClient(db, "carol")
    writer.join("lobby", history=0)
    for index in range(60):
        writer.send(f"old message {index}")
    writer.close()

    alice = start_chat(tmux, server, tmp_path, "alice")
    bob = start_chat(tmux, server, tmp_path, "bob")
    # On entry: the latest page of 50, not the 10 before it.
    screen = alice.wait_for("<carol> old message 59", "<carol> old message 10")
    assert "old message 9\n" not in screen
    alice.enter("/history 5")
    alice.wait_for("== 5 earlier messages, ", "<carol> old message 5", "== end of the earlier")
    assert "old message 4\n" not in alice.screen()

    alice.enter("hello bob")
    bob.wait_for("   <alice> hello bob")
    alice.wait_for("\u00bb <alice> hello bob")  # own messages carry a mark

    # A message arrives while bob is half-way through a line: both stay visible.
    bob.type("half way thr")
    bob.wait_for("bob> half way thr")
    alice.enter("interrupting you")
    screen = bob.wait_for("<alice> interrupting you", "bob> half way thr")
    # prompt_line is "" mid-redraw: wait for the redrawn line, which must be this one.
    wait_until("bob's line redrawn", lambda: prompt_line(bob) == "[#lobby] bob> half way thr")
    assert screen.index("<alice> interrupting you") < screen.rindex("bob> half way thr")
    bob.enter("ough, done")
    alice.wait_for("<bob> half way through, done")

    alice.enter("/me waves")
    bob.wait_for("* alice waves")
    bob.enter("/who")
    bob.wait_for("-- in #lobby: alice, bob")
    bob.enter("/join dev")  # opens dev too: bob stays in lobby until he parts
    bob.wait_for("you are in #dev")
    alice.enter("/who")
    alice.wait_for("-- in #lobby: alice, bob\n")
    bob.enter("/part lobby")
    bob.wait_for("you left #lobby")
    alice.enter("/who")
    alice.wait_for("-- in #lobby: alice\n")
    bob.enter("/rooms")
    bob.wait_for("-- #dev: 0 messages", "-- #lobby: 64 messages")

    # Bad input: one line of error, nothing sent, the client carries on.
    # A refused line stays in the input to be corrected; Ctrl-C clears it.
    bob.enter("/frobnicate")
    bob.wait_for("!! unknown command /frobnicate")
    wait_until("the refused line kept", lambda: prompt_line(bob) == "[#dev] bob> /frobnicate")
    bob.key("C-c")
    wait_until("a cleared line", lambda: prompt_line(bob) == "[#dev] bob>")
    bob.enter("z" * 4100)
    bob.wait_for("!! message is 4100 bytes; the limit is 4096")

    def kept() -> bool:  # the long line is still in the input, below the error
        screen = bob.screen()
        return "z" * 100 in screen[screen.rindex("!! message is 4100 bytes"):]

    wait_until("the refused line kept in the input", kept)
    bob.key("C-c")
    wait_until("a cleared line", lambda: prompt_line(bob) == "[#dev] bob>")
    bob.enter("/join ../../etc")
    bob.wait_for("!! invalid room name")
    bob.key("C-c")
    bob.enter("still here")
    bob.wait_for("\u00bb <bob> still here")
    assert "Traceback" not in bob.screen() + alice.screen()

    # Ctrl-D and Ctrl-C leave cleanly, and each connection is counted out.
    bob.key("C-d")
    bob.wait_for(f"{EXITED} 0")
    alice.type("unsent draft")
    alice.key("C-c")  # clears the draft ...
    wait_until("a cleared line", lambda: prompt_line(alice) == "[#lobby] alice>")
    alice.key("C-c")  # ... and leaves from the empty line
    alice.wait_for(f"{EXITED} 0")
    observer = ChatClient(db)
    try:
        assert observer.who("lobby") == [] and observer.who("dev") == []
    finally:
        observer.close()
        db.close()


def test_server_outage_during_a_conversation(
    tmux: Tmux, server: ServerProcess, tmp_path: Path
) -> None:
    alice = start_chat(tmux, server, tmp_path, "alice")
    bob = start_chat(tmux, server, tmp_path, "bob")
    alice.enter("before the outage")
    bob.wait_for("<alice> before the outage")

    server.stop()
    alice.wait_for("reconnecting...")
    bob.wait_for("reconnecting...")
    # Said in the conversation too, not only in the status bar (issue 15).
    alice.wait_for("!! connection to the server lost; reconnecting")
    alice.enter("typed during the outage")
    alice.wait_for("(pending, waiting for the server) typed during the outage", "1 pending")

    restarted = ServerProcess(server.data_dir, port=server.port).start()
    try:
        bob.wait_for("<alice> typed during the outage", timeout=30)
        alice.wait_for("\u00bb <alice> typed during the outage")
        alice.wait_gone("(pending")
        alice.wait_for("| connected |", "-- reconnected to the server")
        bob.wait_for("| connected |")
        bob.enter("after the outage")
        alice.wait_for("<bob> after the outage")
        alice.enter("and again")
        bob.wait_for("<alice> and again")
        assert "not sent" not in alice.screen()
        for pane in (alice, bob):
            pane.key("C-d")
            pane.wait_for(f"{EXITED} 0")
    finally:
        restarted.stop()


def test_escape_sequences_from_others_are_shown_not_obeyed(
    tmux: Tmux, tmp_path: Path
) -> None:
    # chatzeo serve refuses these records (tests/test_records.py); a server that
    # does not check (plain ZEO, here `--guard off`) stores them.
    server = ServerProcess(tmp_path / "unchecked", options=("--guard", "off")).start()
    try:
        alice = start_chat(tmux, server, tmp_path, "alice")
        alice.enter("a line that must survive")
        alice.wait_for("<alice> a line that must survive")
        title = alice.title()
        db = open_db(server.address, wait=5)
        try:
            # Set the title, clear the screen, home the cursor, turn red: the record
            # breaks the rules, so it shows as a placeholder.
            post_unchecked(db, "lobby", "mal\x1b[31mlory", "\x1b]2;PWNED\x07\x1b[2J\x1b[Hgotcha")
            # Reversed and invisible characters are allowed in a text: shown escaped.
            post_unchecked(db, "lobby", "mallory", "gotcha \u202eright\u200bhidden")
        finally:
            db.close()
        screen = alice.wait_for("gotcha")
        assert "[malformed message record]" in screen
        assert "<mallory> gotcha \\u202eright\\u200bhidden" in screen
        assert "a line that must survive" in screen  # the screen was not cleared
        assert alice.title() == title and "PWNED" not in alice.title()
        line = next(line for line in alice.screen(escapes=True).splitlines() if "gotcha" in line)
        assert "\u202e" not in line and "\\u202e" in line
        alice.enter("/quit")
        alice.wait_for(f"{EXITED} 0")
    finally:
        server.stop()


def test_scripts_chat_starts_a_server_when_none_answers(tmux: Tmux, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    data = tmp_path / "server-data"
    env = {
        **client_env(tmp_path),
        # --server wins over the environment, as it does for `chatzeo chat`.
        "CHATZEO_SERVER": f"127.0.0.1:{free_port()}",
        "CHATZEO_SERVER_DATA": str(data),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    script = str(REPO / "scripts" / "chat")
    pane = tmux.open("script", [script, "--server", address, "--name", "dora"], env)
    pid_file = data / "server.pid"
    try:
        pane.wait_for(f"no server at {address}; starting one", "dora>", "connected", timeout=30)
        pane.enter("first words")
        pane.wait_for("\u00bb <dora> first words")
        pane.key("C-d")
        pane.wait_for(f"{EXITED} 0")
        pid = pid_file.read_text().strip()
        os.kill(int(pid), 0)  # the pid file names the live server
        # The server outlives the chat, and keeps what was said.
        db = open_db(address, wait=5)
        try:
            reader = ChatClient(db)
            assert [m.text for m in reader.join("lobby")] == ["first words"]
            reader.close()
        finally:
            db.close()
        # Another address over the same data: refused, the pid file left alone.
        other = f"127.0.0.1:{free_port()}"
        again = subprocess.run([script, "--server", other, "--name", "eve"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1
        assert "is still running, on another address? Use its address" in again.stderr
        assert pid_file.read_text().strip() == pid
        # Its probes (`chatzeo ping`: ZEO's ruok) left no error in the server's log.
        log = (data / "server.log").read_text()
        assert "ConnectionResetError" not in log and " ERROR " not in log, log
    finally:
        if pid_file.exists():
            subprocess.run(["kill", pid_file.read_text().strip()], check=False)


def test_keys_typed_while_messages_pour_in_stay_in_the_input_line(
    tmux: Tmux, server: ServerProcess, tmp_path: Path
) -> None:
    alice = start_chat(tmux, server, tmp_path, "alice")
    db = open_db(server.address, wait=5)
    bob = ChatClient(db, "bob")
    bob.join("lobby", history=0)
    typed = "keys-typed-during-a-burst"
    burst = threading.Thread(target=lambda: [bob.send(f"burst {i}") for i in range(40)])
    burst.start()
    try:
        for char in typed:  # one key at a time, interleaved with the arriving lines
            alice.type(char)
    finally:
        burst.join(60)
        bob.close()
        db.close()
    alice.wait_for("<bob> burst 39", f"alice> {typed}")
    wait_until("alice's line redrawn", lambda: prompt_line(alice) == f"[#lobby] alice> {typed}")
    messages = [line for line in alice.lines() if "<bob> burst" in line]
    # Nothing the user typed was echoed into the output by the tty.
    assert [line.split("<bob> ")[1] for line in messages] == [f"burst {i}" for i in range(40)]
    alice.key("C-c")
    alice.key("C-c")
    alice.wait_for(f"{EXITED} 0")


def test_chat_without_a_server_says_so_in_one_line(tmux: Tmux, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "chatzeo", "chat", "--server", address, "--wait", "1"]
    pane = tmux.open("lonely", [*argv, "--name", "alice"], client_env(tmp_path))
    screen = pane.wait_for(f"{EXITED} 1")
    assert f"chatzeo: connecting to {address} as alice..." in screen
    assert f"chatzeo: error: nothing listens at {address} (waited 1s)" in screen
    assert "Traceback" not in screen


def test_chat_says_it_is_connecting_at_once(tmux: Tmux, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "chatzeo", "chat", "--server", address, "--wait", "60"]
    pane = tmux.open("patient", [*argv, "--name", "alice"], client_env(tmp_path))
    # Long before the 60 s wait is over, the screen says what is going on.
    pane.wait_for(f"chatzeo: connecting to {address} as alice...", timeout=15)
    assert EXITED not in pane.screen()


FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
FLAG = "\U0001f1eb\U0001f1f7"
SCOTLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"


def cursor_x(pane: Pane) -> int:
    return int(pane.tmux.run("display-message", "-p", "-t", pane.name, "#{cursor_x}"))


def test_emoji_sequences_are_shown_whole_and_edited_as_one_character(
    tmux: Tmux, server: ServerProcess, tmp_path: Path
) -> None:
    alice = start_chat(tmux, server, tmp_path, "alice")
    bob = start_chat(tmux, server, tmp_path, "bob")
    prompt = "[#lobby] alice> "
    alice.type(f"ab{FAMILY}{FLAG}cd")
    alice.wait_for(f"{prompt}ab{FAMILY}{FLAG}cd")
    # Each sequence is one glyph two columns wide, as tmux draws it: the cursor is
    # where the terminal's is, so the prompt is not garbled.
    wait_until("the cursor after the text", lambda: cursor_x(alice) == len(prompt) + 2 + 2 + 2 + 2)
    for _ in range(3):  # over d, c and the flag: three keys, three characters
        alice.key("Left")
    wait_until("the cursor before the flag", lambda: cursor_x(alice) == len(prompt) + 4)
    alice.key("BSpace")  # deletes the whole family, no joiner left behind
    alice.wait_for(f"{prompt}ab{FLAG}cd")
    alice.key("Right")
    alice.key("BSpace")  # and the whole flag
    alice.wait_for(f"{prompt}abcd")
    alice.type(f" {SCOTLAND}")
    alice.key("Enter")
    bob.wait_for("<alice> ab ")
    # Sent whole: the text stored is exactly what was left on the line.
    db = open_db(server.address, wait=5)
    try:
        reader = ChatClient(db)
        assert [m.text for m in reader.join("lobby")] == [f"ab {SCOTLAND}cd"]
        reader.close()
    finally:
        db.close()
    alice.enter(f"family {FAMILY} and \u202eevil")
    screen = bob.wait_for(f"<alice> family {FAMILY} and \\u202eevil")  # bidi stays escaped
    assert "\u202e" not in screen
    for pane in (alice, bob):
        pane.enter("/quit")
        pane.wait_for(f"{EXITED} 0")


def test_leaving_during_an_outage_asks_before_dropping_messages(
    tmux: Tmux, server: ServerProcess, tmp_path: Path
) -> None:
    alice = start_chat(tmux, server, tmp_path, "alice")
    server.stop()
    alice.wait_for("reconnecting...")
    alice.enter("typed while away")
    alice.wait_for("(pending, waiting for the server) typed while away")
    alice.key("C-c")  # an empty line: this would leave, but a message is pending
    alice.wait_for("!! 1 message not sent yet: the server is away. Quit again")
    assert EXITED not in alice.screen()
    alice.key("C-d")  # asked once: the second request leaves
    alice.wait_for(f"{EXITED} 0")
    assert "not sent: typed while away" in alice.screen()


def test_long_lines_wrap_at_words_and_the_status_bar_fits_after_a_resize(
    tmux: Tmux, server: ServerProcess, tmp_path: Path
) -> None:
    alice = start_chat(tmux, server, tmp_path, "alice")
    words = " ".join(f"word{index:02d}" for index in range(40))
    alice.enter(words)

    def printed() -> list[str]:  # the message's rows, once all of it is printed
        rows = alice.screen().splitlines()
        first = [index for index, row in enumerate(rows) if "<alice> word00" in row]
        if not first:
            return []
        shown = [row for row in rows[first[0]:] if "word" in row and not row.startswith("[#")]
        return shown if "word39" in shown[-1] else []

    rows = wait_until("the long message", printed)
    indent = rows[0].index("<alice> ") + len("<alice> ")
    assert len(rows) > 1 and rows[0].startswith(tuple("0123456789"))
    for row in rows[1:]:  # continuation rows start under the text, at a whole word
        assert row[:indent].strip() == "" and row[indent:indent + 4] == "word", row
    assert " ".join(row[indent:].strip() for row in rows) == words
    alice.type("half a line")

    def status_rows() -> list[str]:
        return [row for row in alice.lines() if "connected" in row and "#lobby" in row]

    for columns in (80, 40):
        tmux.run("resize-window", "-t", alice.name, "-x", str(columns), "-y", str(HEIGHT))
        wait_until(f"a redraw at {columns} columns",
                   lambda: prompt_line(alice) == "[#lobby] alice> half a line")
        # One prompt and one status bar, however often the terminal was resized ...
        wait_until("no stale prompt copies",
                   lambda: sum("alice> half a line" in row for row in alice.lines()) == 1)
        # ... and at 40 columns the status bar still says whether it is connected.
        def fits(width: int = columns) -> bool:
            return [len(row) < width for row in status_rows()] == [True]

        wait_until(f"a status bar that fits {columns} columns", fits)
        assert "connected" in status_rows()[0], alice.screen()
    alice.key("C-c")
    alice.key("C-c")
    alice.wait_for(f"{EXITED} 0")


def whole_history(pane: Pane) -> list[str]:
    """Every row tmux holds for the pane, scrollback included, wrapped rows joined."""
    text = pane.tmux.run("capture-pane", "-p", "-J", "-S", "-", "-t", pane.name)
    return [row.rstrip() for row in text.splitlines()]


def test_resizing_leaves_no_stale_prompt_in_the_scrollback(
    tmux: Tmux, server: ServerProcess, tmp_path: Path
) -> None:
    """tmux re-wraps its lines on a resize; however often and however far the
    window changes width, no copy of the prompt or the status bar may be left in the
    scrollback (the live ones are the last rows), and what was printed before them
    stays, once, above them."""
    # A second connection under the name makes the chat print a notice longer than
    # the window: a line the terminal itself wraps, and re-wraps on every resize.
    db = open_db(server.address, wait=5)
    other = ChatClient(db, "alice")
    try:
        alice = start_chat(tmux, server, tmp_path, "alice")
        alice.wait_for("also in use by another connection")
    finally:
        other.close()
        db.close()
    for index in range(2):  # few: the prompt starts near the top
        alice.enter(f"line {index} " + "filler " * 20)  # long: they re-wrap too
    alice.wait_for("<alice> line 1")
    alice.type("half a line")
    wait_until("the typed line", lambda: prompt_line(alice) == "[#lobby] alice> half a line")
    # Ctrl-L clears by scrolling: the conversation goes to the scrollback, the input
    # stays at the bottom (prompt_toolkit's own clear put it on the top row, the
    # first row a narrower terminal pushes out, taking the prompt with it).
    alice.key("C-l")

    def cleared() -> bool:
        visible = tmux.run("capture-pane", "-p", "-t", alice.name)
        return "<alice> line" not in visible and "alice> half a line" in visible

    wait_until("the screen cleared, the prompt redrawn", cleared)

    def counts(rows: list[str]) -> tuple[list[int], list[int]]:
        # (at 24 columns prompt_toolkit wraps the typed line itself: "alice> half a l")
        prompts = [i for i, row in enumerate(rows) if "alice> half a" in row]
        bars = [i for i, row in enumerate(rows) if "connected" in row and "#lobby" in row]
        return prompts, bars

    copies = (1, 1)  # the live prompt and the live bar

    def drawn_once() -> list[str] | None:
        rows = whole_history(alice)
        prompts, bars = counts(rows)
        shown = [row for row in rows if row.strip()]
        # Only the live ones, at the end.
        if (len(prompts), len(bars)) == copies and shown[-1] == rows[bars[-1]] and (
                rows[prompts[-1]] in shown[-3:-1]):
            return rows
        return None

    # Narrower and wider by turns, past the bar's width (it must re-wrap) and down
    # to where the typed line itself no longer fits on one row.
    for columns in (100, 60, 100, 60, 40, 120, 30, 80, 24, 120, 45, 120):
        tmux.run("resize-window", "-t", alice.name, "-x", str(columns), "-y", str(HEIGHT))
        def redrawn(width: int = columns) -> bool:
            return tmux.run(
                "display-message", "-p", "-t", alice.name, "#{pane_width}"
            ).strip() == str(width) and "alice> half a" in alice.screen()

        wait_until(f"the prompt redrawn at {columns} columns", redrawn)
        try:
            rows = wait_until(f"no new prompt or status bar copy at {columns} columns",
                              drawn_once, timeout=5)
        except AssertionError as error:
            raise AssertionError(
                f"{error} ({copies} before)\n--- whole history ---\n"
                + "\n".join(whole_history(alice))
            ) from None
        said = [row for row in rows if "<alice> line" in row]
        assert [row.split("<alice> ")[1].split()[:2] for row in said] == [
            ["line", "0"], ["line", "1"]], rows
    alice.key("C-c")
    alice.key("C-c")
    alice.wait_for(f"{EXITED} 0")


def test_a_second_client_under_the_same_name_is_pointed_out_and_not_taken_for_own(
    tmux: Tmux, server: ServerProcess, tmp_path: Path
) -> None:
    alice = start_chat(tmux, server, tmp_path, "alice")
    impostor = tmux.open(
        "impostor",
        [sys.executable, "-m", "chatzeo", "chat", "--server", server.address, "--name", "alice"],
        client_env(tmp_path),
    )
    impostor.wait_for("the name alice is also in use by another connection right now",
                      "proves nothing")
    impostor.enter("I am alice, honest")
    screen = alice.wait_for("<alice> I am alice, honest")
    line = next(row for row in screen.splitlines() if "I am alice, honest" in row)
    assert "\u00bb" not in line  # not marked as the real alice's own
    alice.enter("no you are not")
    alice.wait_for("\u00bb <alice> no you are not")
    impostor.wait_for("   <alice> no you are not")
    for pane in (alice, impostor):
        pane.enter("/quit")
        pane.wait_for(f"{EXITED} 0")
