"""The terminal client without a terminal: command parsing, drawing, the screen's
pending messages, the client worker on a real database (in memory and over a real
ZEO server that goes away), and the prompt app driven through a pipe."""

from __future__ import annotations

import asyncio
import io
import queue
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
import ZODB
from hostile import post_unchecked
from hypothesis import given
from hypothesis import strategies as st
from prompt_toolkit.application import create_app_session
from prompt_toolkit.formatted_text import FormattedText, fragment_list_to_text
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from ZEO.Exceptions import ClientDisconnected

from chatzeo.client import ChatClient
from chatzeo.database import open_db
from chatzeo.errors import InvalidInput, InvalidMessage, InvalidName, RetryLimitExceeded
from chatzeo.message import Message
from chatzeo.terminal.app import ChatScreen, chat
from chatzeo.terminal.commands import (
    MAX_HISTORY,
    Help,
    History,
    InvalidCommand,
    Join,
    Quit,
    Rooms,
    Say,
    Who,
    parse,
)
from chatzeo.terminal.display import OWN_MARK, message_line, prompt_text, stamp, status_text
from chatzeo.terminal.events import (
    Arrived,
    Earlier,
    EarlierPage,
    Event,
    Joined,
    Landed,
    Notice,
    NotSent,
    Outgoing,
    Problem,
)
from chatzeo.terminal.sanitize import is_clean
from chatzeo.terminal.worker import ClientWorker
from chatzeo.testing import ServerProcess, chatzeo_command, wait_until
from chatzeo.validation import MAX_MESSAGE_BYTES, check_text

ESCAPES = "\x1b]2;PWNED\x07\x1b[2J\x9b31m\u202e"
# What chatzeo's rules let a text hold that a terminal must still not obey: bidi
# overrides, invisible characters, line separators.
TRICKY = "\u202eright\u200bhidden\u2028next"


def text_of(line: FormattedText) -> str:
    return fragment_list_to_text(line)


def message(text: str, author: str | None = "bob", key: int = 1_700_000_000_000_000) -> Message:
    return Message("0" * 32, "lobby", key, author, text)


# -- commands ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("hello", Say("hello")),
        ("  spaced  ", Say("  spaced  ")),
        ("//not a command", Say("/not a command")),
        ("/me waves", Say("waves", "action")),
        ("/ME  waves twice ", Say("waves twice", "action")),
        ("/join dev", Join("dev")),
        ("/join #dev", Join("dev")),
        ("/history 20", History(20)),
        (f"/history {MAX_HISTORY}", History(MAX_HISTORY)),
        ("/rooms", Rooms()),
        ("/who", Who()),
        ("/help", Help()),
        ("/quit", Quit()),
        ("/quit see you tomorrow", Quit("see you tomorrow")),
        ("", None),
        ("   ", None),
    ],
)
def test_parse(line: str, command: object) -> None:
    assert parse(line) == command


@pytest.mark.parametrize(
    ("line", "error", "says"),
    [
        ("/nope", InvalidCommand, "unknown command /nope"),
        ("/me", InvalidCommand, "/me needs an action"),
        ("/join", InvalidCommand, "/join needs one room name"),
        ("/join a b", InvalidCommand, "/join needs one room name"),
        ("/join ../etc", InvalidName, "invalid room name"),
        ("/history", InvalidCommand, "needs a number"),
        ("/history ten", InvalidCommand, "whole number"),
        ("/history 0", InvalidCommand, "from 1 to"),
        (f"/history {MAX_HISTORY + 1}", InvalidCommand, "from 1 to"),
        ("/who is there", InvalidCommand, "/who takes no argument"),
        ("evil \x1b[2J", InvalidMessage, "control character U+001B"),
        ("x" * (MAX_MESSAGE_BYTES + 1), InvalidMessage, "the limit is"),
        ("/me \x07", InvalidMessage, "control character U+0007"),
    ],
)
def test_parse_refuses_with_one_line(line: str, error: type[Exception], says: str) -> None:
    with pytest.raises(error) as raised:
        parse(line)
    assert says in str(raised.value)
    assert "\n" not in str(raised.value)


@given(st.text(max_size=300))
def test_parse_accepts_or_refuses_any_line_cleanly(line: str) -> None:
    try:
        command = parse(line)
    except InvalidInput:
        return
    if isinstance(command, Say):
        assert check_text(command.text) == command.text


# -- drawing -----------------------------------------------------------------------


def test_message_line_shows_time_author_text_and_marks_own() -> None:
    now = time.time()
    theirs = message("hi", "bob", int(now * 1_000_000))
    mine = message("hello", "alice", int(now * 1_000_000))
    when = stamp(now, now)
    assert text_of(message_line(theirs, False, now)) == f"{when}   <bob> hi"
    assert text_of(message_line(mine, True, now)) == f"{when} {OWN_MARK} <alice> hello"
    action = Message("0" * 32, "lobby", int(now * 1_000_000), "bob", "waves", "action")
    assert text_of(message_line(action, False, now)).endswith("* bob waves")
    assert text_of(message_line(message("x", None), False, now)).endswith("<anonymous> x")


def test_scripts_get_the_terminal_line_without_its_marks() -> None:
    """`chatzeo tail`/`history` print what the terminal draws, from the same
    formatter, minus the mark column: own and mention marks mean nothing there."""
    from chatzeo.cli import format_line
    from chatzeo.terminal.display import plain_line

    now = time.time()
    said = message(f"hi @alice {ESCAPES}", "bob", int(now * 1_000_000))
    drawn = text_of(message_line(said, False, now, mention=True))
    assert format_line(said) == plain_line(said, now)
    assert format_line(said) == drawn.replace(" ! ", " ", 1)
    assert format_line(said).startswith(f"{stamp(now, now)} <bob> hi @alice ")
    assert is_clean(format_line(said))
    action = Message("0" * 32, "lobby", int(now * 1_000_000), "bob", "waves", "action")
    assert format_line(action) == f"{stamp(now, now)} * bob waves"
    old = message("before", "bob", int((now - 3 * 86400) * 1_000_000))
    assert format_line(old) == f"{stamp(now - 3 * 86400, now)} <bob> before"
    assert len(format_line(old).split(" <bob>")[0]) == len("2026-11-21 12:00:00")


def test_stamp_adds_the_date_for_an_older_day() -> None:
    now = time.mktime((2026, 11, 23, 12, 0, 0, 0, 0, -1))
    assert stamp(now - 60, now) == "11:59:00"
    assert stamp(now - 2 * 86400, now) == "2026-11-21 12:00:00"


def test_everything_drawn_is_sanitized() -> None:
    hostile = message(f"text {ESCAPES}", author=f"mal{ESCAPES}")
    drawn = [
        message_line(hostile, False, time.time()),
        prompt_text("alice", f"room{ESCAPES}", [("say", ESCAPES)], False),
        status_text("alice", f"room{ESCAPES}", f"srv{ESCAPES}", True, 1),
    ]
    for line in drawn:
        shown = text_of(line)
        assert is_clean(shown), repr(shown)
        assert "\\x1b]2;PWNED\\x07\\x1b[2J\\x9b31m\\u202e" in shown


def test_prompt_lists_pending_messages_and_status_shows_connection() -> None:
    prompt = text_of(prompt_text("alice", "lobby", [("say", "one"), ("action", "waves")], False))
    assert prompt.splitlines() == [
        "   (pending, waiting for the server) one",
        "   (pending, waiting for the server) * alice waves",
        "[#lobby] alice> ",
    ]
    assert "(pending, sending) one" in text_of(prompt_text("a", "b", [("say", "one")], True))
    assert "reconnecting..." in text_of(status_text("alice", "lobby", "srv", False, 2))
    assert "2 pending" in text_of(status_text("alice", "lobby", "srv", False, 2))
    assert "connected" in text_of(status_text("alice", "lobby", "srv", True, 0))


# -- the screen: typed lines and worker events ---------------------------------------


class Recorder:
    """The screen's collaborators, recording what it asked for."""

    def __init__(self) -> None:
        self.requests: list[object] = []
        self.shown: list[str] = []
        self.connected = True

    def screen(self, columns: int = 200, now: float | None = None) -> ChatScreen:
        screen = ChatScreen(
            "alice",
            "srv",
            self.requests.append,
            lambda: self.connected,
            show=lambda lines: self.shown.extend(text_of(line) for line in lines),
            redraw=lambda: None,
            columns=lambda: columns,
            clock=(lambda: now) if now is not None else time.time,
        )
        screen.on_event(Joined("lobby", ()))
        self.shown.clear()
        return screen


def test_screen_keeps_a_message_pending_until_it_lands() -> None:
    recorder = Recorder()
    screen = recorder.screen()
    recorder.connected = False
    assert screen.on_line("first") and screen.on_line("/me waves")
    first, second = recorder.requests
    assert first == Outgoing(1, "first", "say") and second == Outgoing(2, "waves", "action")
    assert "(pending, waiting for the server) first" in text_of(screen.prompt())
    assert "2 pending" in text_of(screen.status())
    recorder.connected = True
    landed = message("first", "alice")
    screen.on_event(Landed(1, (landed,), landed.id))
    assert "first" not in text_of(screen.prompt()) and "waves" in text_of(screen.prompt())
    assert recorder.shown[-1].endswith(f"{OWN_MARK} <alice> first")
    screen.on_event(NotSent(2, "gave up after 15s"))
    assert recorder.shown[-1] == "!! not sent: waves (gave up after 15s)"
    assert screen.pending == {}


def test_screen_reports_bad_input_in_one_line_and_sends_nothing() -> None:
    recorder = Recorder()
    screen = recorder.screen()
    for line in ("/bogus", "bad \x1b[2J", "y" * (MAX_MESSAGE_BYTES + 10), "/history x"):
        assert screen.on_line(line)
    assert recorder.requests == []
    assert len(recorder.shown) == 4 and all(line.startswith("!! ") for line in recorder.shown)
    assert "unknown command /bogus" in recorder.shown[0]
    assert "U+001B" in recorder.shown[1]
    assert not screen.on_line("/quit")


def test_screen_pages_back_from_the_oldest_message_shown() -> None:
    recorder = Recorder()
    screen = recorder.screen()
    screen.on_line("/history 5")
    assert recorder.requests == [] and recorder.shown == ["-- no earlier messages"]
    first, second = message("one", key=10), message("two", key=20)
    screen.on_event(Arrived((first, second)))
    screen.on_line("/history 5")
    assert recorder.requests == [Earlier(5, first)]
    older = message("zero", key=5)
    screen.on_event(EarlierPage(first, (older,)))
    assert screen.oldest == older
    assert recorder.shown[-2].endswith("<bob> zero")
    screen.on_event(EarlierPage(older, ()))
    assert recorder.shown[-1].startswith("-- no messages before")


def test_screen_shows_notices_problems_and_room_changes() -> None:
    recorder = Recorder()
    screen = recorder.screen()
    screen.on_line("/who")
    screen.on_line("/join dev")
    assert recorder.requests == [Who(), Join("dev")]
    screen.on_event(Notice((f"in #lobby: mal{ESCAPES}",)))
    screen.on_event(Problem("the server is away"))
    page = (Message("1" * 32, "dev", 7, "carol", "earlier"),)
    screen.on_event(Joined("dev", page))
    assert screen.room == "dev" and screen.oldest == page[0]
    assert all(is_clean(line) for line in recorder.shown)
    assert recorder.shown[1] == "!! the server is away"
    assert recorder.shown[-1].startswith("-- you are in #dev (the last message above;")


# -- the worker on a real database ---------------------------------------------------


class Events:
    """A thread-safe inbox for the worker's events."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def deliver(self, event: Event) -> None:
        self._queue.put(event)

    def next(self, kind: type, timeout: float = 30.0) -> Any:
        """The next event of ``kind``, skipping others (named if none comes)."""
        deadline = time.monotonic() + timeout
        skipped: list[Event] = []
        while True:
            try:
                event = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {kind.__name__} event within {timeout}s; skipped {skipped}"
                ) from None
            if isinstance(event, kind):
                return event
            skipped.append(event)


@pytest.fixture
def memory_db() -> Iterator[ZODB.DB]:
    db = ZODB.DB(None)
    try:
        yield db
    finally:
        db.close()


def start_worker(
    open_client: Callable[[], ChatClient], **options: Any
) -> tuple[ClientWorker, Events, Joined]:
    events = Events()
    worker = ClientWorker(open_client, "lobby", events.deliver, **options)
    joined = worker.start().result(timeout=30)
    return worker, events, joined


def test_worker_joins_sends_receives_and_answers(memory_db: ZODB.DB) -> None:
    other = ChatClient(memory_db, "bob")
    other.join("lobby")
    for index in range(60):
        other.send(f"old {index}")
    worker, events, joined = start_worker(lambda: ChatClient(memory_db, "alice"))
    try:
        assert [m.text for m in joined.page] == [f"old {i}" for i in range(10, 60)]
        worker.submit(Outgoing(1, "mine"))
        landed = events.next(Landed)
        assert landed.id == 1 and [m.text for m in landed.messages] == ["mine"]
        other.send("pushed")
        assert [m.text for m in events.next(Arrived).messages] == ["pushed"]
        worker.submit(Earlier(5, joined.page[0]))
        assert [m.text for m in events.next(EarlierPage).messages] == [
            f"old {i}" for i in range(5, 10)
        ]
        worker.submit(Who())
        assert events.next(Notice).lines == ("in #lobby: alice, bob",)
        worker.submit(Join("dev"))
        assert events.next(Joined) == Joined("dev", (), rooms=("lobby", "dev"))
        worker.submit(Rooms())
        assert events.next(Notice).lines == ("#dev: 0 messages", "#lobby: 62 messages")
        worker.submit(Outgoing(2, "bad \x1b"))  # the UI validates; the worker still copes
        assert "U+001B" in events.next(NotSent).reason
    finally:
        assert worker.stop()
    assert other.who("lobby") == ["bob"] and other.who("dev") == []
    other.close()


def test_a_send_is_checked_once_sent_once_and_read_back_once(
    memory_db: ZODB.DB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data path reads forward: a typed line is checked where it is parsed, the
    worker posts it once and reads it back once (the receive that shows it, not
    also a look-up after the commit); a request wakes the worker without looking
    like a commit to its rooms."""
    import chatzeo.session as session_module
    from chatzeo.session import ChatSession

    counts: dict[str, int] = {"check": 0, "find": 0, "new": 0, "insert": 0}
    real_check = session_module.plain_text  # type: ignore[attr-defined]  # its own import

    def counting(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper

    worker, events, _ = start_worker(lambda: ChatClient(memory_db, "alice"))
    try:
        wait_until("the worker settled", lambda: worker.is_connected())
        said = parse("hello once")
        assert isinstance(said, Say)
        monkeypatch.setattr(session_module, "check_text", counting("check", real_check),
                            raising=False)
        monkeypatch.setattr(ChatSession, "_find", counting("find", ChatSession._find))
        monkeypatch.setattr(ChatSession, "new_messages",
                            counting("new", ChatSession.new_messages))
        monkeypatch.setattr(ChatSession, "_insert", counting("insert", ChatSession._insert))
        receive_all = counting("receive_all", ChatClient.receive_all)
        counts["receive_all"] = 0
        monkeypatch.setattr(ChatClient, "receive_all", receive_all)
        worker.submit(Outgoing(1, said.text))
        landed = events.next(Landed)
        assert [m.text for m in landed.messages] == ["hello once"]
        assert landed.stored == landed.messages[0].id
        # Posted once, read back once (one read of the open rooms), no look-up.
        assert (counts["insert"], counts["find"], counts["new"]) == (1, 0, 1), counts
        before = dict(counts)
        worker.submit(Who())  # a request, no commit: no room is read for news
        assert events.next(Notice).lines == ("in #lobby: alice",)
        assert counts["receive_all"] == before["receive_all"] == 1, counts  # the send's
        assert counts["new"] == before["new"], counts
    finally:
        assert worker.stop()


def test_checked_text_is_checked_once_and_plain_text_always() -> None:
    """What the boundary checked is not checked again inward; a library caller's
    plain string is, wherever it is posted."""
    from chatzeo.validation import CheckedText, checked_text, plain_text

    once = checked_text("fine")
    assert isinstance(once, CheckedText) and plain_text(once) == "fine"
    assert type(plain_text(once)) is str  # what is stored is a plain str
    with pytest.raises(InvalidMessage):
        plain_text("evil \x1b[2J")
    with pytest.raises(TypeError):
        CheckedText("evil \x1b[2J")  # only the check makes one
    db = ZODB.DB(None)
    try:
        client = ChatClient(db, "alice")
        client.join("lobby")
        with pytest.raises(InvalidMessage):
            client.room.add_message("evil \x1b[2J", "alice")  # type: ignore[union-attr]
        stored = client.send(checked_text("kept"), read_back=False)
        assert [m.text for m in client.receive()] == ["kept"]
        assert type(client.history(1)[0].text) is str and stored.text == "kept"
        client.close()
    finally:
        db.close()


class GivesUp(ChatClient):
    """A client whose every post runs out of retries, as against a dying server."""

    def send(self, text: str, kind: Any = "say", *, read_back: bool = True) -> Message:
        raise RetryLimitExceeded("posting", 7, 15.2, ClientDisconnected("gone"))


def test_worker_marks_a_message_not_sent_when_retries_run_out(memory_db: ZODB.DB) -> None:
    worker, events, _ = start_worker(lambda: GivesUp(memory_db, "alice"))
    try:
        worker.submit(Outgoing(1, "doomed"))
        assert events.next(NotSent) == NotSent(1, "gave up after 15s")
    finally:
        assert worker.stop()


def test_worker_heartbeat_renews_the_lease(memory_db: ZODB.DB) -> None:
    now = [1000.0]
    worker, _, _ = start_worker(
        lambda: ChatClient(memory_db, "alice", clock=lambda: now[0]), heartbeat_every=0.05
    )
    observer = ChatClient(memory_db, clock=lambda: now[0])
    try:
        now[0] += 45  # a lease is 60s; only renewals keep alice present past 1060
        wait_until("a renewal at t=1045", lambda: _lease_expiry(memory_db, "alice") > 1100)
        now[0] += 45
        assert observer.who("lobby") == ["alice"]
    finally:
        assert worker.stop()
        observer.close()


def _lease_expiry(db: ZODB.DB, user: str) -> float:
    connection = db.open()
    try:
        leases = connection.root()["chatzeo"].users[user].leases
        return max(expiry for _, expiry in leases.values())
    finally:
        connection.close()


# -- the worker when the server goes away --------------------------------------------


@pytest.fixture
def zeo_db(server: ServerProcess) -> Iterator[ZODB.DB]:
    db = open_db(server.address, wait=5)
    try:
        yield db
    finally:
        db.close()


def test_worker_holds_messages_while_the_server_is_away(
    server: ServerProcess, zeo_db: ZODB.DB, tmp_path: Path
) -> None:
    worker, events, _ = start_worker(lambda: ChatClient(zeo_db, "alice"))
    restarted: ServerProcess | None = None
    try:
        worker.submit(Outgoing(1, "before"))
        assert events.next(Landed).id == 1
        server.stop()
        wait_until("the client to notice", lambda: not worker.is_connected())
        worker.submit(Who())
        assert "away" in events.next(Problem).text
        worker.submit(Outgoing(2, "during"))
        worker.submit(Outgoing(3, "during, too"))
        restarted = ServerProcess(server.data_dir, port=server.port).start()
        landed = [events.next(Landed), events.next(Landed)]
        assert [event.id for event in landed] == [2, 3]
        texts = [m.text for event in landed for m in event.messages]
        assert texts == ["during", "during, too"]
        check = ChatClient(zeo_db)
        assert [m.text for m in check.join("lobby")] == ["before", "during", "during, too"]
        check.close()
    finally:
        assert worker.stop()
        if restarted is not None:
            restarted.stop()


def test_worker_gives_up_when_the_server_stays_away(
    server: ServerProcess, zeo_db: ZODB.DB
) -> None:
    worker, events, _ = start_worker(lambda: ChatClient(zeo_db, "alice"), give_up_after=0.5)
    try:
        server.stop()
        wait_until("the client to notice", lambda: not worker.is_connected())
        worker.submit(Outgoing(1, "into the void"))
        event = events.next(NotSent)
        assert event.id == 1 and "did not come back within 0.5s" in event.reason
    finally:
        assert worker.stop(timeout=10)


# -- the prompt app, driven through a pipe -------------------------------------------


async def until(label: str, condition: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {label}")
        await asyncio.sleep(0.02)


def test_prompt_app_chats_through_a_pipe(server: ServerProcess, zeo_db: ZODB.DB) -> None:
    shown: list[str] = []
    bob = ChatClient(zeo_db, "bob")
    bob.join("lobby")
    bob.send("welcome")

    def saw(text: str) -> bool:
        return any(text in line for line in shown)

    async def scenario() -> bool:
        with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
            session = asyncio.ensure_future(
                chat(
                    lambda: ChatClient(zeo_db, "alice"),
                    "alice",
                    "lobby",
                    server.address,
                    show=lambda lines: shown.extend(text_of(line) for line in lines),
                )
            )
            await until("the history page", lambda: saw("<bob> welcome"))
            pipe.send_text("hello bob\r")
            await until("own message", lambda: saw(f"{OWN_MARK} <alice> hello bob"))
            # Text the server allows that a terminal would still obey or hide.
            post_unchecked(zeo_db, "lobby", "bob", f"hi {TRICKY}")
            await until("bob's reply", lambda: saw("<bob> hi \\u202eright"))
            pipe.send_text("/who\r")
            await until("who", lambda: saw("-- in #lobby: alice, bob"))
            pipe.send_text("/frobnicate\r")
            await until("an error", lambda: saw("!! unknown command /frobnicate"))
            pipe.send_text("half typ")  # Ctrl-C clears a half-typed line ...
            pipe.send_text("\x03")
            pipe.send_text("\x03")  # ... and leaves from an empty one
            return await asyncio.wait_for(session, 20)

    try:
        assert asyncio.run(scenario()) is True
        assert all(is_clean(line) for line in shown)
        assert bob.who("lobby") == ["bob"]  # alice was counted out
        assert [m.text for m in bob.receive()][-2:] == ["hello bob", f"hi {TRICKY}"]
    finally:
        bob.close()


def test_chat_refuses_to_run_without_a_terminal(tmp_path: Path) -> None:
    done = subprocess.run(
        chatzeo_command("chat", "--server", "127.0.0.1:1", "--name", "alice"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr == (
        "chatzeo: error: chatzeo chat needs a terminal; scripts can use chatzeo send and tail\n"
    )


def test_worker_costs_no_cpu_while_the_server_is_away_and_comes_back_quickly(
    server: ServerProcess, zeo_db: ZODB.DB
) -> None:
    # A heartbeat that falls due during the outage once made the worker spin; with
    # heartbeat_every=0.2 several fall due inside the measured window.
    worker, events, _ = start_worker(lambda: ChatClient(zeo_db, "alice"), heartbeat_every=0.2)
    restarted: ServerProcess | None = None
    try:
        server.stop()
        wait_until("the client to notice", lambda: not worker.is_connected())
        worker.submit(Outgoing(1, "written while the server is away"))
        time.sleep(0.5)  # let the heartbeat fall due (the condition under test)
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(3.0)  # the measured window: this process, every thread, is idle
        share = (time.process_time() - cpu) / (time.monotonic() - wall)
        print(f"client CPU while the server is away: {share:.2%} of a core")
        assert share < 0.02
        restarted = ServerProcess(server.data_dir, port=server.port).start()
        back = time.monotonic()
        landed = events.next(Landed, timeout=30)
        waited = time.monotonic() - back
        print(f"reconnected and sent {waited:.2f}s after the server answered")
        assert landed.id == 1 and worker.is_connected()
        assert waited < 5.0, waited  # ~0.5 s here; the bound allows a loaded machine
    finally:
        assert worker.stop()
        if restarted is not None:
            restarted.stop()


# -- what is one's own, leaving, refused lines, wrapping, dates ----------------------------


def test_own_messages_are_the_ones_this_connection_sent_not_its_name() -> None:
    recorder = Recorder()
    screen = recorder.screen()
    now = int(time.time() * 1_000_000)
    impostor = Message("1" * 32, "lobby", now, "alice", "I am alice too")
    mine = Message("2" * 32, "lobby", now + 1, "alice", "the real one")
    screen.on_line("the real one")
    screen.on_event(Arrived((impostor,)))
    screen.on_event(Landed(1, (mine,), mine.id))
    assert OWN_MARK not in recorder.shown[0]
    assert recorder.shown[0].endswith("   <alice> I am alice too")
    assert recorder.shown[1].endswith(f"{OWN_MARK} <alice> the real one")


def test_a_refused_line_stays_in_the_input() -> None:
    recorder = Recorder()
    screen = recorder.screen()
    screen.on_line("y" * (MAX_MESSAGE_BYTES + 1))
    assert screen.keep_input and recorder.shown[-1].startswith("!! message is")
    screen.on_line("fine")
    assert not screen.keep_input


def test_leaving_with_messages_the_server_has_not_stored_asks_first() -> None:
    recorder = Recorder()
    screen = recorder.screen()
    assert screen.may_leave()  # nothing pending
    recorder.connected = False
    screen.on_line("one")
    assert screen.on_line("/quit")  # True: still here, and told why
    assert recorder.shown[-1] == (
        "!! 1 message not sent yet: the server is away. Quit again (Ctrl-C, Ctrl-D or /quit) "
        "to leave without it, or wait for the server"
    )
    assert not screen.on_line("/quit")  # the second time, it leaves


def test_quit_with_a_message_posts_it_and_leaves() -> None:
    recorder = Recorder()
    screen = recorder.screen()
    assert not screen.on_line("/quit see you tomorrow")
    assert recorder.requests == [Outgoing(1, "see you tomorrow")]


def test_long_messages_wrap_at_words_under_the_text() -> None:
    recorder = Recorder()
    screen = recorder.screen(columns=41)
    words = "the quick brown fox jumps over the lazy dog " * 3
    screen.on_event(Arrived((message(words.strip(), "bob", int(time.time() * 1_000_000)),)))
    lines = recorder.shown
    assert len(lines) > 2 and all(len(line) <= 40 for line in lines)
    indent = lines[0].index("<bob> ") + len("<bob> ")
    assert all(line[:indent] == " " * indent and line[indent] != " " for line in lines[1:])
    # Every break is between words: the words read back in order.
    assert " ".join(line[indent:] for line in lines[1:]).split() + lines[0][indent:].split() != []
    assert " ".join([lines[0][indent:], *(line[indent:] for line in lines[1:])]) == words.strip()


def test_status_bar_keeps_the_connection_state_at_40_columns() -> None:
    for columns in (40, 30):
        shown = text_of(
            status_text("alice", "a-long-room-name", "127.0.0.1:8765", False, 2, columns - 1)
        )
        assert "reconnecting..." in shown and "2 pending" in shown
        assert len(shown) <= max(columns - 1, len(" reconnecting... | 2 pending "))


def test_history_is_framed_and_dated_with_day_lines() -> None:
    now = time.mktime((2026, 11, 23, 12, 0, 0, 0, 0, -1))
    recorder = Recorder()
    screen = recorder.screen(now=now)
    day = 86400 * 1_000_000
    today = int(now * 1_000_000)
    page = (
        Message("a" * 32, "lobby", today - 2 * day, "bob", "two days ago"),
        Message("b" * 32, "lobby", today - 60_000_000, "bob", "a minute ago"),
    )
    screen.on_event(Joined("lobby", page))
    assert recorder.shown[:4] == [
        "-- Saturday 21 November 2026 --",
        "2026-11-21 12:00:00   <bob> two days ago",
        "-- Monday 23 November 2026 --",
        "11:59:00   <bob> a minute ago",
    ]
    recorder.shown.clear()
    older = (Message("c" * 32, "lobby", today - 3 * day, "carol", "three days ago"),)
    screen.on_event(EarlierPage(page[0], older))
    assert recorder.shown == [
        "== 1 earlier message, 2026-11-20 12:00:00 to 2026-11-20 12:00:00 ==",
        "-- Friday 20 November 2026 --",
        "2026-11-20 12:00:00   <carol> three days ago",
        "== end of the earlier messages; newer ones are above, from 2026-11-21 12:00:00 ==",
    ]


def test_worker_joins_rooms_without_regard_to_case(memory_db: ZODB.DB) -> None:
    other = ChatClient(memory_db, "bob")
    other.join("dev")
    other.send("one")
    worker, events, _ = start_worker(lambda: ChatClient(memory_db, "alice"))
    try:
        worker.submit(Join("DEV"))
        joined = events.next(Joined)
        assert joined.room == "dev" and [m.text for m in joined.page] == ["one"]
        worker.submit(Rooms())
        assert events.next(Notice).lines == ("#dev: 1 message", "#lobby: 0 messages")
    finally:
        assert worker.stop()
    # An old database may hold rooms differing only in case: the exact name picks
    # one, any other spelling is refused rather than guessed.
    connection = memory_db.open()
    root = connection.root()["chatzeo"]
    root.room("Dev")
    transaction.commit()
    connection.close()
    assert other.find_room("Dev") == "Dev" and other.find_room("dev") == "dev"
    with pytest.raises(InvalidInput, match="matches several rooms: Dev, dev"):
        other.join("DEV")
    other.close()


# -- emoji sequences in the input line -----------------------------------------------

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
FLAG = "\U0001f1eb\U0001f1f7"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1


def test_input_line_draws_each_emoji_sequence_as_one_cell_two_columns_wide() -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.data_structures import Size
    from prompt_toolkit.layout import screen as pt_screen
    from prompt_toolkit.output.vt100 import Vt100_Output

    from chatzeo.terminal.editing import GraphemeWidths, grapheme_bindings

    output = Vt100_Output(_Tty(), lambda: Size(rows=10, columns=60), term="xterm")
    cells: list[tuple[int, str, int]] = []
    cursor: list[int] = []

    async def scenario() -> None:
        with create_pipe_input() as pipe, create_app_session(input=pipe, output=output):
            session: PromptSession[str] = PromptSession(
                input_processors=[GraphemeWidths()], key_bindings=grapheme_bindings()
            )
            answer = asyncio.ensure_future(session.prompt_async("> "))
            pipe.send_text(f"ab{FAMILY}{FLAG}cd")

            def drawn() -> bool:
                last = session.app.renderer._last_screen
                return last is not None and any(
                    cell.char == "d" for cell in last.data_buffer[0].values()
                )

            await until("the line drawn", drawn)
            row = session.app.renderer._last_screen.data_buffer[0]  # type: ignore[union-attr]
            cells.extend((x, row[x].char, row[x].width) for x in sorted(row) if row[x].char.strip())
            cursor.append(session.app.renderer._cursor_pos.x)
            pipe.send_text("\r")
            await asyncio.wait_for(answer, 10)

    asyncio.run(scenario())
    assert cells == [(0, ">", 1), (2, "a", 1), (3, "b", 1), (4, FAMILY, 2), (6, FLAG, 2),
                     (8, "c", 1), (9, "d", 1)]
    assert cursor == [10]
    # The width marks survive the classes a window appends after the processors.
    assert pt_screen._CHAR_CACHE[FLAG, " class:grapheme-w2 class:last-line"].width == 2
    assert pt_screen._CHAR_CACHE["\U0001f1f7", " class:grapheme-tail class:last-line"].width == 0


@pytest.mark.parametrize(
    ("widths", "row", "column", "columns", "expected"),
    [
        # Prompt and bar, both fit: erase from the cursor's row, draw there.
        ([27, 53], 0, 27, 100, (0, 0)),
        # The bar re-wraps to two rows below the cursor: the terminal moved the cursor
        # up by one, so the redraw starts one row lower, on the prompt's old row.
        ([27, 53], 0, 27, 40, (0, 1)),
        ([27, 53], 0, 27, 20, (1, 3)),  # and the typed line: the cursor on its 2nd row
        # A pending line above the input re-wraps: erase from two rows up, redraw one
        # row lower than that (the rows below the cursor did not grow).
        ([50, 27, 40], 1, 27, 40, (2, 1)),
        # The typed line itself re-wraps around the cursor.
        ([27, 20], 0, 27, 24, (1, 1)),
        # Wider: nothing grows, nothing moves down.
        ([27, 53], 0, 27, 200, (0, 0)),
        ([], 0, 0, 80, (0, 0)),
    ],
)
def test_the_prompt_is_found_where_a_re_wrapping_terminal_put_it(
    widths: list[int], row: int, column: int, columns: int, expected: tuple[int, int]
) -> None:
    from chatzeo.terminal.app import _rewrapped

    assert _rewrapped(widths, row, column, columns) == expected
