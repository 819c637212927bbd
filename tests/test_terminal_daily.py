"""The terminal's several-rooms screen without a terminal: activity counts, mentions and
the bell, catch-up lines, commands, completion and multi-line drawing (issue 15).

tests/test_tmux_daily.py runs the same in a real terminal.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText, fragment_list_to_text

from chatzeo.errors import InvalidInput
from chatzeo.message import Message
from chatzeo.terminal.app import ChatScreen
from chatzeo.terminal.commands import Bell, Part, Switch, Topic, parse
from chatzeo.terminal.completion import ChatCompleter
from chatzeo.terminal.display import catch_up_lines, message_lines, prompt_text, status_text
from chatzeo.terminal.events import Activity, Arrived, Joined, PresenceChanged


def _text(line: FormattedText) -> str:
    return "".join(fragment[1] for fragment in line)


def _message(room: str, text: str, author: str = "bob", key: int = 1) -> Message:
    return Message(f"id-{room}-{key}", room, 1_700_000_000_000_000 + key, author, text)


def _screen() -> Any:
    shown: list[str] = []
    submitted: list[object] = []
    rings: list[int] = []
    screen = ChatScreen(
        "alice", "server", submitted.append, lambda: True,
        show=lambda lines: shown.extend(_text(line) for line in lines),
        redraw=lambda: None, columns=lambda: 100, ring=lambda: rings.append(1),
    )
    screen.on_event(Joined("general", (), rooms=("general", "dev", "ops")))
    return screen, shown, submitted, rings


def test_other_rooms_are_counted_not_printed_and_a_mention_rings():
    screen, shown, _, rings = _screen()
    shown.clear()
    screen.on_event(Arrived((
        _message("dev", "build is green", key=1),
        _message("dev", "@alice please look", key=2),
        _message("general", "hello here", key=3),
    )))
    messages = [line for line in shown if "<" in line]  # not the day line before them
    assert len(messages) == 1 and messages[0].endswith("<bob> hello here")
    assert screen.activity() == [(2, "dev", 2, 1)]
    assert "#general [2:dev(2,@1)]" in _text(screen.status())
    assert rings == [1]
    screen.on_event(Arrived((_message("ops", "alice: are you there?", key=4),)))
    assert rings == [1, 1] and screen.activity()[-1] == (3, "ops", 1, 1)
    screen.on_line("/bell off")
    screen.on_event(Arrived((_message("ops", "@alice again", key=5),)))
    assert rings == [1, 1], "the bell rang after /bell off"
    screen.on_line("/bell")
    assert shown[-1] == "-- the bell on a mention is off"


def test_own_messages_never_ring_and_switch_keys_follow_the_order():
    screen, _, submitted, rings = _screen()
    mine = _message("dev", "@alice note to self", author="alice", key=9)
    screen.own.add(mine.id)
    screen.on_event(Arrived((mine,)))
    assert rings == []
    screen.switch_number(3)
    screen.cycle(1)  # before the worker answered: moves on from ops, to general
    assert submitted == [Switch("ops"), Switch("general")]
    screen.switch_number(7)  # no such room: nothing
    assert len(submitted) == 2


def test_catch_up_lines_say_how_many_came_and_how_many_were_lost():
    screen, shown, _, _ = _screen()
    shown.clear()
    page = tuple(_message("dev", f"m{i}", key=i) for i in range(3))
    screen.on_event(Joined("dev", page, new=5, lost=2, switched=True,
                           rooms=("general", "dev", "ops")))
    assert shown[0] == "-- now in #dev"
    assert shown[1].startswith("\u2014 2 messages lost to retention since you left")
    assert shown[2] == "\u2014 5 new since you left \u2014"
    assert "the last 3 of them below" in shown[3]
    assert [_text(line) for line in catch_up_lines(1, 0)] == ["\u2014 1 new since you left \u2014"]


def test_presence_lines_only_for_the_current_room_and_quits_from_anywhere():
    screen, shown, _, _ = _screen()
    shown.clear()
    screen.on_event(PresenceChanged("dev", came=("carol",), present=("alice", "carol")))
    assert shown == [] and screen.present["dev"] == ("alice", "carol")
    screen.on_event(PresenceChanged("general", came=("carol",), parted=("dave",)))
    screen.on_event(PresenceChanged("", quit=("erin",)))
    assert shown == ["--> carol joined #general", "<-- dave left #general", "<-- erin quit"]


def test_activity_at_start_counts_and_names_known_rooms():
    from chatzeo.unread import RoomUnread

    screen, _, _, _ = _screen()
    screen.on_event(Activity((RoomUnread("ops", 4, 0, 1, 10, 20),), ("dev", "general", "ops", "x")))
    assert screen.activity() == [(3, "ops", 4, 1)]
    assert "x" in screen.room_names()


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("/switch dev", Switch("dev")),
        ("/switch #Dev", Switch("Dev")),
        ("/part", Part()),
        ("/part ops", Part("ops")),
        ("/topic", Topic()),
        ("/topic release Friday", Topic("release Friday")),
        ("/topic -delete", Topic("")),
        ("/bell off", Bell(False)),
        ("/bell", Bell(None)),
    ],
)
def test_new_commands_parse(line, command):
    assert parse(line) == command


@pytest.mark.parametrize(
    "line", ["/switch", "/switch a b", "/part ../x", "/bell maybe", "/mentions me", "/topic \x1b"]
)
def test_bad_new_commands_are_one_line_errors(line):
    with pytest.raises(InvalidInput) as error:
        parse(line)
    assert "\n" not in str(error.value)


def test_completion_of_commands_rooms_and_nicks():
    completer = ChatCompleter(lambda: ["bob", "bobby", "carol"], lambda: ["dev", "devops", "ops"])

    def complete(text: str) -> list[str]:
        found = completer.get_completions(Document(text), CompleteEvent(completion_requested=True))
        return [completion.text for completion in found]

    assert complete("/sw") == ["/switch "]
    assert complete("/join #de") == ["dev", "devops"]
    assert complete("bo") == ["bob: ", "bobby: "]
    assert complete("hi @ca") == ["@carol"]
    assert complete("hi ca") == ["carol"]
    assert complete("hi ") == []


def test_multi_line_messages_are_drawn_indented_under_the_text():
    message = _message("general", "first line\nsecond line\n\x1b[31mthird")
    lines = [_text(line) for line in message_lines(message, False, 0.0, 80)]
    column = lines[0].index("first line")
    assert lines[1] == " " * column + "second line"
    assert lines[2].startswith(" " * column) and "\x1b" not in lines[2]


def test_status_bar_fits_with_activity_and_topic():
    full = _text(status_text("alice", "general", "server:1", True, 0, 200, "2:dev(3)", "ship it"))
    assert "#general [2:dev(3)]" in full and "topic: ship it" in full
    narrow = _text(status_text("alice", "general", "server:1", True, 0, 40, "2:dev(3)", "ship it"))
    assert len(narrow) <= 40 and "connected" in narrow


def test_private_rooms_are_labelled_once_and_a_direct_message_elsewhere_is_said() -> None:
    """The prompt and the status bar name a private room by its label (not
    ``##plans (private)`` or ``#@bob``); a direct message that comes while one is in
    another room is said there, with where to read it; /switch takes ``@bob``."""
    assert fragment_list_to_text(prompt_text("alice", "#plans (private)", [], True)) == (
        "[#plans (private)] alice> ")
    assert fragment_list_to_text(prompt_text("alice", "@bob", [], True)) == "[@bob] alice> "
    assert fragment_list_to_text(prompt_text("alice", "lobby", [], True)) == "[#lobby] alice> "
    for key, label in (("@bob", " @bob |"), ("#plans (private)", " #plans (private) |"),
                       ("lobby", " #lobby |")):
        bar = fragment_list_to_text(status_text("alice", key, "server", True, 0))
        assert bar.startswith(label) and "##" not in bar and "#@" not in bar, bar
    assert parse("/switch @bob") == Switch("@bob")
    assert parse("/part @bob") == Part("@bob")

    screen, shown, _, _ = _screen()
    screen.on_event(Joined("general", (), rooms=("general", "@bob", "#plans (private)")))
    shown.clear()
    now = time.time()
    screen.on_event(Arrived((
        Message("1" * 32, "@bob", int(now * 1_000_000), "bob", "psst"),
        Message("2" * 32, "@bob", int(now * 1_000_000) + 1, "bob", "are you there?"),
        Message("3" * 32, "#plans (private)", int(now * 1_000_000) + 2, "carol", "not a DM"),
    )))
    assert shown == ["-- 2 direct messages from bob in @bob (Alt-2 or /switch @bob to read)"]
    assert screen.unread == {"@bob": 2, "#plans (private)": 1}
    shown.clear()
    screen.on_event(Joined("@bob", (), switched=True, rooms=("general", "@bob")))
    screen.on_event(Arrived((Message("4" * 32, "@bob", int(now * 1_000_000) + 3, "bob", "hi"),)))
    assert not any("direct message" in line for line in shown)  # read where it is shown
