"""A working day in a real terminal (issue 15): two users in three rooms, the activity
list, mentions ringing the bell (tmux's window bell flag), catch-up after a restart,
completion, multi-line messages, join/part/quit lines.

tmux panes running real `chatzeo chat` processes against a real server, read back with
``capture-pane``; helpers and the ``tmux`` fixture come from tests/test_tmux.py. Without
tmux these tests skip, or fail when ``CHATZEO_REQUIRE_TMUX=1`` (CI sets it).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_tmux import EXITED, Pane, Tmux, prompt_line, start_chat
from test_tmux import tmux as _tmux_fixture  # noqa: F401 (the "tmux" fixture)

from chatzeo.testing import ServerProcess, chatzeo_command, wait_until

pytestmark = pytest.mark.tmux


@pytest.fixture
def tmux(_tmux_fixture: Tmux) -> Tmux:  # noqa: F811
    """tests/test_tmux.py's private tmux server, under the name its helpers expect."""
    return _tmux_fixture


def bell(pane: Pane) -> bool:
    """Whether the pane's window has rung its bell (tmux keeps the flag until seen)."""
    return pane.tmux.run("display-message", "-p", "-t", pane.name, "#{window_bell_flag}") \
        .strip() == "1"


def status_bar(pane: Pane) -> str:
    """The status bar (" #room ..."), or "" while the screen is being redrawn."""
    lines = [line for line in pane.lines() if line.startswith(" #")]
    return lines[-1] if lines else ""


def after(screen: str, marker: str) -> str:
    """What the screen shows after the last ``marker``."""
    return screen[screen.rindex(marker):]


def test_two_users_in_three_rooms_for_a_day(
    tmux: Tmux, server: ServerProcess, tmp_path: Path
) -> None:
    alice = start_chat(tmux, server, tmp_path, "alice", "--room", "general")
    bob = start_chat(tmux, server, tmp_path, "bob", "--room", "general")
    alice.wait_for("--> bob joined #general")
    for room in ("dev", "random"):
        alice.enter(f"/join {room}")
        alice.wait_for(f"you are in #{room}")
    bob.enter("/join dev")
    bob.wait_for("you are in #dev")
    assert prompt_line(alice) == "[#random] alice>"

    # Messages of other rooms are counted in the status bar, not printed here.
    bob.enter("/switch general")
    bob.wait_for("now in #general")
    bob.enter("lunch at noon?")
    wait_until("general counted", lambda: "1:general(1)" in status_bar(alice))
    assert "lunch at noon?" not in alice.screen()
    assert not bell(alice), "a message that does not mention alice rang the bell"

    # A mention elsewhere rings the bell and is counted apart.
    bob.enter("/switch dev")
    bob.wait_for("now in #dev")
    bob.enter("@alice can you review #42?")
    wait_until("dev counted with a mention", lambda: "2:dev(1,@1)" in status_bar(alice))
    wait_until("alice's bell", lambda: bell(alice))
    bob.enter("and another in dev")
    wait_until("dev counted twice", lambda: "2:dev(2,@1)" in status_bar(alice))

    # Alt-2 switches to dev: what came while away, under the catch-up line.
    alice.key("M-2")
    screen = alice.wait_for("now in #dev", "\u2014 2 new since you left \u2014",
                            "<bob> and another in dev")
    shown = after(screen, "now in #dev")
    assert shown.index("2 new since you left") < shown.index("@alice can you review")
    assert "! <bob> @alice can you review #42?" in shown  # marked as a mention
    wait_until("dev read, general not", lambda: (
        "dev(" not in (bar := status_bar(alice)) and "1:general(1)" in bar))

    # Ctrl-N/Ctrl-P cycle; /switch by name; the topic shows on arrival and in the bar.
    alice.key("C-n")
    alice.wait_for("now in #random")
    alice.key("C-p")
    alice.key("C-p")
    screen = alice.wait_for("now in #general", "\u2014 1 new since you left \u2014")
    assert "<bob> lunch at noon?" in after(screen, "now in #general")
    alice.enter("/topic release on Friday")
    alice.wait_for("alice set the topic of #general: release on Friday")
    wait_until("topic in the bar", lambda: "topic: release on Friday" in status_bar(alice))
    bob.enter("/switch general")
    bob.wait_for("topic of #general: release on Friday (set by alice")

    # /mentions lists the mention across rooms; /part leaves one (presence says so).
    alice.enter("/mentions")
    alice.wait_for("the latest 1 message mentioning you:", "#dev ")
    alice.enter("/switch dev")
    alice.wait_for("now in #dev")
    bob.enter("/part dev")
    bob.wait_for("you left #dev")
    alice.wait_for("<-- bob left #dev")
    bob.key("C-d")
    bob.wait_for(f"{EXITED} 0")
    alice.wait_for("<-- bob quit")  # from general, which alice is not looking at
    assert "Traceback" not in alice.screen() + bob.screen()
    alice.key("C-d")
    alice.wait_for(f"{EXITED} 0")


def test_a_restart_shows_what_came_since_and_counts_the_rest(
    tmux: Tmux, server: ServerProcess, tmp_path: Path
) -> None:
    alice = start_chat(tmux, server, tmp_path, "alice", "--room", "general")
    for room in ("dev", "ops"):
        alice.enter(f"/join {room}")
        alice.wait_for(f"you are in #{room}")
    alice.enter("/switch general")
    alice.wait_for("now in #general")
    alice.key("C-d")
    alice.wait_for(f"{EXITED} 0")

    bob = start_chat(tmux, server, tmp_path, "bob", "--room", "general")
    for index in range(3):
        bob.enter(f"while you were out {index}")
    bob.enter("/join dev")
    bob.wait_for("you are in #dev")
    bob.enter("alice: the build is red")
    bob.enter("second dev message")
    bob.wait_for("<bob> second dev message")

    unread = subprocess.run(
        chatzeo_command("unread", "--server", server.address, "--name", "alice", "--json"),
        capture_output=True, timeout=60, text=True,
    )
    rows = {row["room"]: row for row in map(json.loads, unread.stdout.splitlines())}
    assert [(r["room"], r["unread"], r["mentions"]) for r in rows.values()] == [
        ("general", 3, 0), ("dev", 2, 1), ("ops", 0, 0),
    ], unread.stderr

    # The rooms alice joined come back; the current one shows what came since.
    again = tmux.open("alice2", [*chatzeo_command(
        "chat", "--server", server.address, "--name", "alice", "--room", "general", "--no-bell")],
        {"TERM": "xterm-256color", "PYTHONPATH": str(Path(__file__).parent.parent)})
    screen = again.wait_for("\u2014 3 new since you left \u2014", "while you were out 2",
                            "also open: #dev, #ops")
    start = screen.index("3 new since you left")
    assert [screen.index(f"while you were out {i}") > start for i in range(3)] == [True] * 3
    wait_until("dev in the activity list", lambda: "2:dev(2,@1)" in status_bar(again))
    assert not bell(again), "--no-bell rang anyway"
    again.key("M-2")
    again.wait_for("\u2014 2 new since you left \u2014", "<bob> alice: the build is red")
    again.key("C-d")
    again.wait_for(f"{EXITED} 0")
    bob.key("C-d")


def test_completion_and_multi_line_messages(
    tmux: Tmux, server: ServerProcess, tmp_path: Path
) -> None:
    alice = start_chat(tmux, server, tmp_path, "alice", "--room", "general")
    bob = start_chat(tmux, server, tmp_path, "bob", "--room", "general")
    alice.wait_for("--> bob joined #general")
    alice.enter("/join devops")
    alice.wait_for("you are in #devops")

    alice.type("/sw")
    alice.key("Tab")
    alice.wait_for("alice> /switch")  # and a space, which capture-pane drops at the end
    alice.type("gen")
    alice.key("Tab")
    alice.wait_for("alice> /switch general")
    alice.key("Enter")
    alice.wait_for("now in #general")
    alice.type("bo")
    alice.key("Tab")
    alice.wait_for("alice> bob:")
    alice.type("see @b")
    alice.key("Tab")
    alice.wait_for("alice> bob: see @bob")
    alice.key("Enter")
    bob.wait_for("<alice> bob: see @bob")

    # Alt-Enter: a new line of the same message, drawn indented under the text.
    alice.type("first line")
    alice.key("M-Enter")
    alice.type("second line")
    alice.key("Enter")
    screen = bob.wait_for("<alice> first line", "second line")
    lines = screen.splitlines()
    first = next(i for i, line in enumerate(lines) if line.endswith("<alice> first line"))
    text_column = lines[first].index("first line")
    assert lines[first + 1] .rstrip() == " " * text_column + "second line"

    # A bracketed paste of two lines is one message too.
    tmux.run("set-buffer", "-b", "two", "pasted one\npasted two")
    tmux.run("paste-buffer", "-p", "-b", "two", "-t", alice.name)
    alice.wait_for("pasted two")
    alice.key("Enter")
    screen = bob.wait_for("<alice> pasted one")
    lines = screen.splitlines()
    first = next(i for i, line in enumerate(lines) if line.endswith("<alice> pasted one"))
    assert lines[first + 1].strip() == "pasted two"
    for pane in (alice, bob):
        pane.key("C-d")
        pane.wait_for(f"{EXITED} 0")
