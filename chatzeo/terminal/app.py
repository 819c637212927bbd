"""`chatzeo chat`: talking in several rooms from a terminal.

One prompt_toolkit `PromptSession` application, running for the whole chat, reads
lines at the bottom of the terminal while messages from others are printed above it
(`print_lines`), without disturbing a half-typed line.
On the row under the input a status bar shows the current room, the activity list of the other
open rooms (``2:dev(3,@1)``: room 2 has 3 unread messages, one mentions you), the
topic and whether the server is connected ("reconnecting..." while it is away);
messages typed but not yet stored are shown above the input as pending until they
land, or printed as "not sent".

Several rooms: the rooms a user joined are reopened at start; only the current
room's messages are printed, the others' are counted. Switching (``/switch``,
Alt-1..9, Ctrl-N/Ctrl-P) prints what came while one was elsewhere, under a line
such as "— 12 new since you left —", as does the start for the current room; the
read markers behind it are in the database (`chatzeo.client.ChatClient.mark_read`).
A message that mentions you is highlighted and rings the terminal's bell (``/bell
off``, or ``--no-bell``, to stop it); join, part and quit lines come from presence,
and "connection lost"/"reconnected" lines are printed in the conversation.

Why prompt_toolkit rather than Textual: a chat is a line-oriented conversation, and
prompt_toolkit keeps it in the terminal's own scrollback (copy, search and scroll
work as usual, and what was said stays on screen after leaving), gives line
editing and history for free, and needs only a prompt below ordinary output;
Textual would take over the whole screen with its own widgets and scrolling for
no gain here, and adds a dependency where prompt_toolkit is already one.

Resizing: lines already printed stay as they were wrapped (a terminal that
re-wraps, such as tmux, re-wraps them), the status bar is redrawn to fit the new
width, and no copy of the prompt or the bar is left in the scrollback; a resize
may leave blank rows above the prompt instead (`_status_under_the_input` says
what tmux 3.3a does and how the prompt is drawn around it). Ctrl-L clears by
scrolling the conversation up into the scrollback.

Keys: Enter sends; Ctrl-C clears a line being typed, and on an empty line leaves
(as Ctrl-D does); leaving while messages wait for an absent server asks first.
Left, Right, Backspace and Delete work on whole characters, emoji sequences
included (`chatzeo.terminal.editing`). A line that is refused stays in the input.

Threads
    UI thread (the main thread, running the asyncio loop): the `PromptSession`,
    `ChatScreen` (parsing typed lines, all drawing) and every print.
    Worker thread (`chatzeo.terminal.worker.ClientWorker`): owns the `ChatClient` and its
    ZODB connection; hands each result over with ``loop.call_soon_threadsafe``.
    ZEO's IO thread only sets the `ChangeFeed`'s event that wakes the worker.
    Nothing on the UI thread waits for the server: the status bar reads ZEO's
    local connection flag every half second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.application import get_app, get_app_or_none
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.filters import Condition, is_done
from prompt_toolkit.formatted_text import (
    FormattedText,
    StyleAndTextTuples,
)
from prompt_toolkit.key_binding import (
    KeyBindings,
    KeyBindingsBase,
    KeyPressEvent,
    merge_key_bindings,
)
from prompt_toolkit.layout import (
    ConditionalContainer,
    Dimension,
    FormattedTextControl,
    HSplit,
    Window,
)
from prompt_toolkit.layout.screen import Char, Screen
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.renderer import CPR_Support
from prompt_toolkit.renderer import print_formatted_text as render_text
from ZODB import DB

from ..client import ChatClient
from ..errors import InvalidInput
from ..message import Message
from ..unread import mention_pattern, mentions
from .commands import (
    HELP,
    Bell,
    Help,
    History,
    Quit,
    Say,
    Switch,
    parse,
)
from .completion import ChatCompleter
from .display import (
    STYLE,
    activity_text,
    catch_up_lines,
    day_line,
    error_line,
    info_line,
    message_lines,
    plural,
    prompt_text,
    room_label,
    stamp,
    status_text,
)
from .editing import GraphemeWidths, grapheme_bindings
from .events import (
    Activity,
    Arrived,
    ConnectionChanged,
    Earlier,
    EarlierPage,
    Event,
    Joined,
    Landed,
    MentionList,
    Notice,
    NotSent,
    Outgoing,
    Parted,
    PresenceChanged,
    Problem,
    Request,
    TopicChanged,
)
from .sanitize import clean
from .worker import ClientWorker

__all__ = ["ChatScreen", "chat", "run_chat", "print_lines"]

log = logging.getLogger(__name__)

# How long leaving waits for the worker to count the connection out; past it the
# lease simply expires on the server.
STOP_TIMEOUT = 5.0
REFRESH_SECONDS = 0.5


def print_lines(lines: Sequence[FormattedText]) -> None:
    """Print lines above the running prompt (or plainly when none is running).

    prompt_toolkit's own way (``run_in_terminal``, which ``print_formatted_text``
    uses) puts the terminal in cooked mode while it prints: a key pressed in that
    moment is echoed by the tty over the output, and Ctrl-D or Ctrl-C is taken by
    the line discipline instead of the prompt (seen in the tmux tests: a Ctrl-D
    lost). Here, in the loop's own thread, the prompt is erased, the lines written
    and the prompt redrawn with the terminal left raw; keys wait in the kernel.
    """
    if not lines:
        return
    merged: StyleAndTextTuples = []
    for line in lines:
        merged.extend(line)
        merged.append(("", "\n"))
    app = get_app_or_none()
    if app is None or not app.is_running or app.is_done:
        print_formatted_text(FormattedText(merged), style=STYLE, end="")
        return
    app.renderer.erase()  # also resets the renderer: the next draw starts here
    render_text(app.output, FormattedText(merged), STYLE, color_depth=app.color_depth)
    app.renderer.request_absolute_cursor_position()
    app.invalidate()


def _redraw() -> None:
    app = get_app_or_none()
    if app is not None:
        app.invalidate()


def _ring() -> None:
    """The terminal's bell (BEL); tmux sets the window's bell flag on it."""
    app = get_app_or_none()
    if app is not None and app.is_running:
        app.output.bell()
    else:
        sys.stdout.write("\a")
        sys.stdout.flush()


def _columns() -> int:
    app = get_app_or_none()
    if app is not None:
        return app.output.get_size().columns
    import shutil

    return shutil.get_terminal_size().columns


def _same_day(one: float, other: float) -> bool:
    return time.localtime(one)[:3] == time.localtime(other)[:3]


class ChatScreen:
    """What the user sees and what their typing does; lives in the UI thread.

    Reacts to a typed line (`on_line`) and to a worker event (`on_event`); draws
    through ``show`` and asks the worker for work through ``submit``. It needs no
    running application, so tests drive it directly.
    """

    def __init__(
        self,
        user: str,
        server: str,
        submit: Callable[[Request], None],
        connected: Callable[[], bool],
        *,
        show: Callable[[Sequence[FormattedText]], None] = print_lines,
        redraw: Callable[[], None] = _redraw,
        clock: Callable[[], float] = time.time,
        columns: Callable[[], int] = _columns,
        ring: Callable[[], None] = _ring,
        bell: bool = True,
    ) -> None:
        self.user = user
        self.server = server
        self.room = ""
        # The open rooms in order (Alt-1 is the first), and what is unread in each.
        self.rooms: list[str] = []
        self.unread: dict[str, int] = {}
        self.mentioned: dict[str, int] = {}
        self.topics: dict[str, tuple[str, str, float] | None] = {}
        self.present: dict[str, tuple[str, ...]] = {}
        # Who spoke in each room lately (for completion), and every room known.
        self.speakers: dict[str, dict[str, None]] = {}
        self.known_rooms: list[str] = []
        self.bell = bell
        self._ring = ring
        self._switching_to: str | None = None
        self._mention = mention_pattern(user)
        self.pending: dict[int, Outgoing] = {}
        # Ids of the messages this connection stored: only those are marked as
        # one's own (a name proves nothing: anyone may connect under any name).
        self.own: set[str] = set()
        # Set when the last line was refused, so the input keeps it to be fixed.
        self.keep_input = False
        self._leave_asked = False
        # The oldest message on screen in this room: `/history` pages back from it.
        self.oldest: Message | None = None
        self._submit = submit
        self._connected = connected
        self._show = show
        self._redraw = redraw
        self._clock = clock
        self._columns = columns
        self._next_id = 0

    # -- drawn by the prompt every refresh ---------------------------------------

    def prompt(self) -> FormattedText:
        """Pending messages, then the input prompt."""
        pending = [(outgoing.kind, outgoing.text) for outgoing in self.pending.values()]
        return prompt_text(self.user, self.room, pending, self._connected())

    def status(self) -> FormattedText:
        """The status bar under the input."""
        topic = self.topics.get(self.room)
        return status_text(
            self.user, self.room, self.server, self._connected(), len(self.pending),
            width=self._columns() - 1,  # the renderer never fills the last column
            activity=activity_text(self.activity()),
            topic=topic[0] if topic else "",
        )

    def activity(self) -> list[tuple[int, str, int, int]]:
        """``(number, room, unread, mentions)`` of the other rooms with unread messages."""
        return [
            (number, name, self.unread.get(name, 0), self.mentioned.get(name, 0))
            for number, name in enumerate(self.rooms, 1)
            if name != self.room and self.unread.get(name)
        ]

    # -- switching rooms -----------------------------------------------------------

    def switch_number(self, number: int) -> None:
        """Switch to the open room numbered ``number`` (Alt-1 is 1), if there is one."""
        if 1 <= number <= len(self.rooms) and self.rooms[number - 1] != self._heading():
            self._switch(self.rooms[number - 1])

    def cycle(self, step: int) -> None:
        """Switch to the next (``step`` 1) or previous (-1) open room."""
        base = self._heading()
        if len(self.rooms) < 2 or base not in self.rooms:
            return
        self._switch(self.rooms[(self.rooms.index(base) + step) % len(self.rooms)])

    def _heading(self) -> str:
        # Keys pressed quickly in a row move on from the room last asked for, not
        # from the one the worker has not switched away from yet.
        return self._switching_to or self.room

    def _switch(self, room: str) -> None:
        self._switching_to = room
        self._submit(Switch(room))

    def nicks(self) -> list[str]:
        """Who is present in the current room, and who spoke there (for completion)."""
        return [*self.present.get(self.room, ()), *self.speakers.get(self.room, ())]

    def room_names(self) -> list[str]:
        """The open rooms and every other room the server listed (for completion)."""
        return [*self.rooms, *self.known_rooms]

    def may_leave(self) -> bool:
        """Whether leaving now loses nothing, or the user was already told it would.

        Messages still pending while the server is connected are sent before the
        worker stops; while it is away they would be lost, so the first request to
        leave only says so, and a second one leaves.
        """
        if not self.pending or self._connected() or self._leave_asked:
            return True
        self._leave_asked = True
        count = len(self.pending)
        self._show([error_line(
            f"{plural(count, 'message')} not sent yet: the server is away. Quit again "
            "(Ctrl-C, Ctrl-D or /quit) to leave without "
            f"{'it' if count == 1 else 'them'}, or wait for the server"
        )])
        return False

    # -- typed lines ---------------------------------------------------------------

    def on_line(self, line: str) -> bool:
        """Act on one typed line; False when the user asked to leave. A refused line
        sets `keep_input`, so it stays in the input to be corrected."""
        self.keep_input = False
        try:
            command = parse(line)
        except InvalidInput as error:
            self._show([error_line(str(error))])
            self.keep_input = True
            return True
        if command is None:
            return True
        if isinstance(command, Quit):
            if command.message:
                self._say(Say(command.message))  # the worker sends it before stopping
            return not self.may_leave()
        if isinstance(command, Help):
            self._show([info_line(text) for text in HELP.splitlines()])
        elif isinstance(command, Bell):
            if command.on is not None:
                self.bell = command.on
            state = "on" if self.bell else "off"
            self._show([info_line(f"the bell on a mention is {state}")])
        elif isinstance(command, Say):
            self._say(command)
        elif isinstance(command, History):
            if self.oldest is None:
                self._show([info_line("no earlier messages")])
            else:
                self._submit(Earlier(command.count, self.oldest))
        else:
            self._submit(command)
        return True

    def _say(self, command: Say) -> None:
        self._next_id += 1
        outgoing = Outgoing(self._next_id, command.text, command.kind)
        self.pending[outgoing.id] = outgoing
        self._submit(outgoing)
        self._redraw()

    # -- worker events -------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Show what the worker reported."""
        if isinstance(event, Joined):
            self._joined(event)
        elif isinstance(event, Arrived):
            self._arrived(event.messages)
        elif isinstance(event, Landed):
            self.pending.pop(event.id, None)
            if event.stored is not None:
                self.own.add(event.stored)
            self._show_messages(event.messages)
            self._redraw()
        elif isinstance(event, NotSent):
            outgoing = self.pending.pop(event.id, None)
            if outgoing is not None:
                self._show([error_line(f"not sent: {outgoing.text} ({event.reason})")])
            self._redraw()
        elif isinstance(event, EarlierPage):
            self._show_earlier(event)
        elif isinstance(event, Notice):
            self._show([info_line(text) for text in event.lines])
        elif isinstance(event, Parted):
            self.rooms = list(event.rooms)
            for table in (self.unread, self.mentioned):
                table.pop(event.room, None)
            self._show([info_line(f"you left {room_label(event.room)}")])
            self._redraw()
        elif isinstance(event, Activity):
            if event.known:
                self.known_rooms = list(event.known)
            for row in event.rooms:
                self.unread[row.room] = row.unread
                self.mentioned[row.room] = row.mentions
            self._redraw()
        elif isinstance(event, PresenceChanged):
            self._presence(event)
        elif isinstance(event, TopicChanged):
            self._topic_changed(event)
        elif isinstance(event, ConnectionChanged):
            if event.up:
                self._show([info_line("reconnected to the server")])
            else:
                self._show([error_line(
                    "connection to the server lost; reconnecting (what you type is sent "
                    "once it is back)")])
        elif isinstance(event, MentionList):
            self._mention_list(event.messages)
        else:
            assert isinstance(event, Problem)
            self._show([error_line(event.text)])

    def _joined(self, event: Joined) -> None:
        self.room = event.room
        if self._switching_to == event.room:
            self._switching_to = None
        if event.rooms:
            self.rooms = list(event.rooms)
        elif event.room not in self.rooms:
            self.rooms.append(event.room)
        self.unread.pop(event.room, None)
        self.mentioned.pop(event.room, None)
        self.topics[event.room] = event.topic
        self.oldest = event.page[0] if event.page else None
        now = self._clock()
        # A private room's label (#plans (private), @bob) comes with the event.
        here = event.shown or room_label(event.room)
        lines: list[FormattedText] = []
        if event.switched:
            lines.append(info_line(f"now in {here}"))
        if event.new or event.lost:
            lines += catch_up_lines(event.new, event.lost)
            if event.new > len(event.page):
                lines.append(info_line(
                    f"the last {len(event.page)} of them below; /history N for the others"))
            lines += self._lines(event.page)
            if event.new:
                lines.append(info_line(f"end of what came while you were away from "
                                       f"{here}"))
        else:
            lines += self._lines(event.page)
        if not event.switched:
            count = len(event.page)
            if event.new:
                shown = "what came since you left above"
            elif count == 1:
                shown = "the last message above"
            elif count:
                shown = f"the last {count} messages above"
            else:
                shown = "no messages yet"
            others = [name for name in self.rooms if name != event.room]
            also = f"; also open: {', '.join(map(room_label, others))}" if others else ""
            lines.append(info_line(
                f"you are in {here} ({shown}; /history N for earlier ones, "
                f"/help for commands{also})"
            ))
        if event.topic and event.topic[0]:
            text, by, when = event.topic
            lines.append(info_line(f"topic of {here}: {text} (set by {by}, "
                                   f"{stamp(when, now)})"))
        self._show(lines)
        self._redraw()

    def _arrived(self, messages: Sequence[Message]) -> None:
        """Show the current room's messages; count the others'. A mention rings."""
        here = [message for message in messages if message.room == self.room]
        ring = False
        for message in messages:
            if message.author:
                spoke = self.speakers.setdefault(message.room, {})
                spoke.pop(message.author, None)
                spoke[message.author] = None
                while len(spoke) > 100:
                    del spoke[next(iter(spoke))]
            mentioned = message.id not in self.own and mentions(
                message, self.user, self._mention)
            ring = ring or mentioned
            if message.room == self.room:
                continue
            self.unread[message.room] = self.unread.get(message.room, 0) + 1
            if mentioned:
                self.mentioned[message.room] = self.mentioned.get(message.room, 0) + 1
        self._show_messages(here)
        self._tell_direct(messages)
        if ring and self.bell:
            self._ring()
        if len(here) != len(messages):
            self._redraw()

    def _tell_direct(self, messages: Sequence[Message]) -> None:
        """A direct message to this user in a conversation they are not looking at
        is said at once, as a line here (where to read it), not only counted."""
        came: dict[str, list[str]] = {}
        for message in messages:
            if message.room[:1] == "@" and message.room != self.room and (
                    message.id not in self.own):
                came.setdefault(message.room, []).append(message.author or "anonymous")
        for room, authors in came.items():
            keys = f"Alt-{self.rooms.index(room) + 1} or " if room in self.rooms[:9] else ""
            who = ", ".join(clean(name) for name in dict.fromkeys(authors))
            self._show([info_line(
                f"{plural(len(authors), 'direct message')} from {who} in {room} "
                f"({keys}/switch {room} to read)")])

    def _presence(self, event: PresenceChanged) -> None:
        if event.room:
            self.present[event.room] = event.present
        elif event.room != self.room:
            # Other rooms' comings and goings are not printed into this one; a quit
            # (room "") is about the person, and is.
            pass
        if event.room and event.room != self.room:
            return
        where = clean(room_label(event.room))
        lines = [FormattedText([("class:presence", f"--> {clean(name)} joined {where}")])
                 for name in event.came if name != self.user]
        lines += [FormattedText([("class:presence", f"<-- {clean(name)} left {where}")])
                  for name in event.parted if name != self.user]
        lines += [FormattedText([("class:presence", f"<-- {clean(name)} quit")])
                  for name in event.quit if name != self.user]
        if lines:
            self._show(lines)

    def _topic_changed(self, event: TopicChanged) -> None:
        self.topics[event.room] = event.topic
        self._redraw()
        if event.room != self.room:
            return
        if event.topic is None:
            self._show([info_line(f"{room_label(event.room)} has no topic")])
            return
        text, by, when = event.topic
        if text:
            line = f"{by} set the topic of {room_label(event.room)}: {text}"
        else:
            line = f"{by} cleared the topic of {room_label(event.room)}"
        self._show([info_line(f"{line} ({stamp(when, self._clock())})")])

    def _mention_list(self, messages: Sequence[Message]) -> None:
        if not messages:
            self._show([info_line("no recent messages mention you")])
            return
        now = self._clock()
        width = max(self._columns() - 1, 20)
        lines = [info_line(f"the latest {plural(len(messages), 'message')} mentioning you:")]
        for message in messages:
            for number, line in enumerate(message_lines(message, False, now, width - 1)):
                prefix = f"{clean(room_label(message.room))} " if number == 0 else " "
                lines.append(FormattedText([("class:info", prefix), *line]))
        self._show(lines)

    def _show_messages(self, messages: Sequence[Message]) -> None:
        if messages and self.oldest is None:
            self.oldest = messages[0]
        if messages:
            self._show(self._lines(messages))

    def _show_earlier(self, event: EarlierPage) -> None:
        if event.before.room != self.room:
            return  # answered after a /join: no longer about what is on screen
        now = self._clock()
        when = stamp(event.before.time, now)
        if not event.messages:
            self._show([info_line(f"no messages before {when}")])
            return
        self.oldest = event.messages[0]
        first, last = event.messages[0].time, event.messages[-1].time
        # The terminal only appends, so older messages land below newer ones:
        # frame them, and date them, so they cannot be taken for new ones.
        count = plural(len(event.messages), "earlier message")
        lines = [_frame(f"{count}, {stamp(first, now)} to {stamp(last, now)}")]
        lines += self._lines(event.messages, dates=True)
        lines.append(_frame(f"end of the earlier messages; newer ones are above, from {when}"))
        self._show(lines)

    def _lines(self, messages: Sequence[Message], dates: bool = False) -> list[FormattedText]:
        """Each message drawn and wrapped, with a day line before the first message
        of each day that is not today (and before today's, after an older one)."""
        now = self._clock()
        width = max(self._columns() - 1, 20)
        lines: list[FormattedText] = []
        previous: float | None = None
        for message in messages:
            new_day = previous is None or not _same_day(previous, message.time)
            if new_day and (not _same_day(message.time, now) or previous is not None or dates):
                lines.append(day_line(message.time))
            previous = message.time
            own = message.id in self.own
            mentioned = not own and mentions(message, self.user, self._mention)
            lines += message_lines(message, own, now, width, mentioned)
        return lines


def _frame(text: str) -> FormattedText:
    return FormattedText([("class:frame", f"== {text} ==")])


async def _prompt_loop(screen: ChatScreen) -> None:
    """One prompt application for the whole chat: Enter hands the line to the
    screen and clears the input, without leaving the application, so the terminal
    stays in raw mode from start to end (see `print_lines`)."""
    # erase_when_done: on leaving, the prompt and status bar are not left behind.
    session: PromptSession[str] = PromptSession(
        style=STYLE,
        erase_when_done=True,
        key_bindings=_chat_bindings(screen),
        input_processors=[GraphemeWidths()],
        completer=ChatCompleter(screen.nicks, screen.room_names),
        complete_while_typing=False,  # Tab completes; typing is never interrupted
        # Lines after the first of a multi-line message, under its first character.
        prompt_continuation=lambda width, line_number, wrapped: " " * width,
    )

    def accept(buffer: Buffer) -> bool:
        if not screen.on_line(buffer.text):
            get_app().exit()
        # A refused line stays, to be corrected; otherwise the input is cleared
        # (the line goes to the input history either way).
        return screen.keep_input

    session.default_buffer.accept_handler = accept
    _status_under_the_input(session, screen.status)
    with patch_stdout(), contextlib.suppress(EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C
        await session.prompt_async(screen.prompt, refresh_interval=REFRESH_SECONDS)


def _status_under_the_input(
    session: PromptSession[str], status: Callable[[], FormattedText]
) -> None:
    """Draw the status bar on the row right under the input, and redraw after a
    resize where the re-wrapped terminal left the input, so that resizing leaves
    no copy of the prompt or the bar in the scrollback.

    What went wrong (seen in tmux 3.3a, which re-wraps its lines on a resize and
    keeps the rows below the cursor at the bottom of the screen; when the cursor's
    own row is pushed into the scrollback it puts the cursor at the top left):

    - prompt_toolkit's ``bottom_toolbar`` asks where the cursor is (CPR) and
      stretches the prompt to the last row of the screen, so a screenful of written
      rows lies below the cursor; a narrower terminal pushes rows into the
      scrollback until the cursor's row goes too, and the erase-and-redraw that
      follows starts below the old prompt: a screenful of copies per resize.
    - A bar filled to the full width with its background is one long line: narrowed,
      it takes several rows below the cursor, which moves the cursor up for good
      (the redrawn bar takes one row again); resize after resize the prompt climbs
      to the top row and then into the scrollback.

    So: no CPR (its only use here is that stretch), the bar as a window of the
    prompt's own layout (``bottom_toolbar`` hides while the height below the cursor
    is unknown, i.e. always without CPR), coloured only as far as its text (the rest
    of its row is blank to the terminal and never re-wraps), and on a resize the
    erase starts where the re-wrapped prompt starts now and the redraw as many rows
    lower as the rows below the cursor grew (`_rewrapped`), which puts the prompt
    back on the row it had (tests/test_tmux.py
    ``test_resizing_leaves_no_stale_prompt_in_the_scrollback``).
    """
    app = session.app
    drawn = [0]  # the terminal's columns when the prompt was last drawn

    def bar() -> FormattedText:
        drawn[0] = app.output.get_size().columns
        return FormattedText([(f"class:bottom-toolbar {style}", part)
                              for style, part, *_ in status()])

    redraw = app._on_resize

    def on_resize() -> None:
        screen, renderer = app.renderer.last_rendered_screen, app.renderer
        columns = max(app.output.get_size().columns, 1)
        if screen is not None and drawn[0] and columns != drawn[0]:
            # prompt_toolkit keeps no public account of where it left the cursor.
            cursor = renderer._cursor_pos
            up, down = _rewrapped(_row_widths(screen), cursor.y, cursor.x, columns)
            output = app.output
            output.write_raw("\r")
            output.cursor_up(up)
            output.erase_down()
            output.cursor_down(down)
            output.flush()
            renderer.reset(leave_alternate_screen=False)  # the cursor is where it draws
        drawn[0] = 0  # a second report of the same resize moves nothing
        redraw()  # erases nothing more (the cursor is where the prompt starts), draws

    setattr(app, "_on_resize", on_resize)  # noqa: B010 (read by the running app; see above)
    output = app.output

    def erase_down() -> None:
        # The same erase, but never issued from the top-left cell: there tmux takes
        # it for a clear screen and first copies the screen (prompt and bar) into the
        # scrollback. From one column further it erases the rest, then the row.
        output.write_raw("\x1b7\x1b[C\x1b[J\x1b8\x1b[K")

    setattr(output, "erase_down", erase_down)  # noqa: B010 (used by the renderer)
    app.renderer.cpr_support = CPR_Support.NOT_SUPPORTED
    root = session.layout.container
    assert isinstance(root, HSplit)  # PromptSession's layout: input, toolbars
    root.children.append(ConditionalContainer(
        Window(FormattedTextControl(bar), dont_extend_height=True, height=Dimension(min=1)),
        filter=~is_done,
    ))


def _row_widths(screen: Screen) -> list[int]:
    """The columns each row of a drawn prompt takes in the terminal: up to its last
    character other than an unstyled space (the terminal keeps no trailing blanks;
    prompt_toolkit fills the rest of a row with spaces it never writes)."""
    widths = []
    for y in range(screen.height):
        row: Mapping[int, Char] = screen.data_buffer.get(y, {})
        used = [x + max(char.width, 1) for x, char in row.items()
                if char.char != " " or "class:" in char.style.replace("class:last-line", "")]
        widths.append(max(used, default=0))
    return widths


def _rewrapped(widths: Sequence[int], row: int, column: int, columns: int) -> tuple[int, int]:
    """Where a prompt drawn as rows ``widths`` wide, with the cursor at ``column``
    of ``row``, is after a terminal re-wrapped each row to ``columns``:
    ``(up, down)``, the rows from the cursor's row up to the prompt's first one now,
    and then the rows down to the one it started on before. A terminal that wraps
    lines narrower keeps its last rows at the bottom of the screen, so the cursor
    moved up by what the rows below it grew; drawn where it starts now, the prompt
    would climb with every resize until the cursor's row left the screen.
    Widened, nothing below grows, and it is drawn where it starts."""

    def rows(width: int) -> int:
        return max(1, -(-width // columns))

    if not widths:
        return 0, 0
    row = min(max(row, 0), len(widths) - 1)
    inside = min(column // columns, rows(widths[row]) - 1)  # the cursor's row of its line
    up = sum(rows(width) for width in widths[:row]) + inside
    below = rows(widths[row]) - 1 - inside + sum(rows(width) for width in widths[row + 1:])
    grown = below - (len(widths) - 1 - row)
    return up, max(grown + up - row, 0)


def _chat_bindings(screen: ChatScreen) -> KeyBindingsBase:
    """Ctrl-C clears a line being typed and leaves from an empty one, as shells and
    IRC clients do; Ctrl-D leaves from an empty line. Leaving with messages the
    server has not stored yet asks first (`ChatScreen.may_leave`)."""
    bindings = KeyBindings()
    empty = Condition(lambda: not get_app().current_buffer.text)

    @bindings.add("c-c")
    def _interrupt(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        if buffer.text:
            buffer.reset()
        elif screen.may_leave():
            event.app.exit()

    @bindings.add("c-d", filter=empty)
    def _end(event: KeyPressEvent) -> None:
        if screen.may_leave():
            event.app.exit()

    # Alt-Enter (sent as Escape, Enter) starts a new line of the same message; a
    # bracketed paste already inserts its newlines as text.
    @bindings.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    @bindings.add("c-l")
    def _clear(event: KeyPressEvent) -> None:
        # Cleared by scrolling: what was said goes up into the scrollback and the
        # input stays at the bottom. prompt_toolkit's own clear (erase the screen,
        # draw at the top row) leaves the prompt where a narrowing terminal that
        # re-wraps (tmux) pushes the cursor's row out of the screen, and the redraw
        # then leaves the prompt behind in the scrollback.
        app = event.app
        app.renderer.erase()
        app.output.write_raw("\r\n" * app.output.get_size().rows)
        app.output.flush()
        app.invalidate()

    @bindings.add("c-n")
    def _next_room(event: KeyPressEvent) -> None:
        screen.cycle(1)

    @bindings.add("c-p")
    def _previous_room(event: KeyPressEvent) -> None:
        screen.cycle(-1)

    for number in range(1, 10):

        @bindings.add("escape", str(number))
        def _room_number(event: KeyPressEvent, number: int = number) -> None:
            screen.switch_number(number)

    return merge_key_bindings([grapheme_bindings(), bindings])


async def chat(
    open_client: Callable[[], ChatClient],
    user: str,
    room: str,
    server: str,
    *,
    show: Callable[[Sequence[FormattedText]], None] = print_lines,
    heartbeat_every: float = 20.0,
    give_up_after: float = 120.0,
    bell: bool = True,
) -> bool:
    """Run the chat in the current prompt_toolkit app session until the user leaves.

    ``open_client`` is called in the worker thread; ``show``, ``heartbeat_every``
    and ``give_up_after`` are for tests. Raises what connecting or
    joining raised. Returns True once the worker has closed its client, False if it
    was still busy after `STOP_TIMEOUT` (its connection must then not be closed
    under it).
    """
    loop = asyncio.get_running_loop()
    screen: ChatScreen | None = None

    def deliver(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(on_event, event)
        except RuntimeError:  # the loop is gone: nobody is left to tell
            log.info("dropped %r after the chat ended", event)

    def on_event(event: Event) -> None:
        assert screen is not None
        screen.on_event(event)

    worker = ClientWorker(
        open_client, room, deliver, heartbeat_every=heartbeat_every, give_up_after=give_up_after
    )
    screen = ChatScreen(user, server, worker.submit, worker.is_connected, show=show, bell=bell)
    joined: Joined = await asyncio.wrap_future(worker.start())
    screen.on_event(joined)
    try:
        await _prompt_loop(screen)
    finally:
        # Messages still waiting come back as NotSent events before the thread ends.
        finished = await asyncio.to_thread(worker.stop, STOP_TIMEOUT)
    if not finished:
        show([error_line("the server did not answer in time; leaving anyway")])
    return finished


def run_chat(db: DB, user: str, room: str, server: str, *, bell: bool = True) -> int:
    """`chatzeo chat` on ``db``, which the command line opened (with its TLS
    settings) and this takes over: closed when the chat ends, unless the worker is
    still using it (then exiting the process ends both). ``user`` and ``room`` are
    checked names; ``server`` is how the server is shown. Returns the exit status."""
    finished = True
    try:
        finished = asyncio.run(chat(lambda: ChatClient(db, user), user, room, server, bell=bell))
    finally:
        if finished:  # otherwise the worker still uses it; exiting ends it
            db.close()
    return 0
