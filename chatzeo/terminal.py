"""`chatzeo chat`: talking in a room from a terminal.

One prompt_toolkit `PromptSession` application, running for the whole chat, reads
lines at the bottom of the terminal while messages from others are printed above it
(`print_lines`), without disturbing a half-typed line.
Below the input a status bar shows the room and whether the server is connected
("reconnecting..." while it is away); messages typed but not yet stored are shown
above the input as pending until they land, or printed as "not sent".

Why prompt_toolkit rather than Textual: a chat is a line-oriented conversation, and
prompt_toolkit keeps it in the terminal's own scrollback (copy, search and scroll
work as usual, and what was said stays on screen after leaving), gives line
editing and history for free, and needs only a prompt below ordinary output;
Textual would take over the whole screen with its own widgets and scrolling for
no gain here, and adds a dependency where prompt_toolkit is already one.

Threads
    UI thread (the main thread, running the asyncio loop): the `PromptSession`,
    `ChatScreen` (parsing typed lines, all drawing) and every print.
    Worker thread (`chatzeo.worker.ClientWorker`): owns the `ChatClient` and its
    ZODB connection; hands each result over with ``loop.call_soon_threadsafe``.
    ZEO's IO thread only sets the `ChangeFeed`'s event that wakes the worker.
    Nothing on the UI thread waits for the server: the status bar reads ZEO's
    local connection flag every half second.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.application import get_app, get_app_or_none
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.formatted_text import FormattedText, StyleAndTextTuples
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.renderer import print_formatted_text as render_text

from .client import ChatClient
from .commands import HELP, Help, History, Quit, Say, parse
from .database import open_db
from .display import STYLE, error_line, info_line, message_line, prompt_text, stamp, status_text
from .errors import ChatError, InvalidInput
from .message import Message
from .tls import context_from_options
from .validation import check_room_name, check_user_name
from .worker import (
    Arrived,
    ClientWorker,
    Earlier,
    EarlierPage,
    Event,
    Joined,
    Landed,
    Notice,
    NotSent,
    Outgoing,
    Problem,
    Request,
)

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
    ) -> None:
        self.user = user
        self.server = server
        self.room = ""
        self.pending: dict[int, Outgoing] = {}
        # The oldest message on screen in this room: `/history` pages back from it.
        self.oldest: Message | None = None
        self._submit = submit
        self._connected = connected
        self._show = show
        self._redraw = redraw
        self._clock = clock
        self._next_id = 0

    # -- drawn by the prompt every refresh ---------------------------------------

    def prompt(self) -> FormattedText:
        """Pending messages, then the input prompt."""
        pending = [(outgoing.kind, outgoing.text) for outgoing in self.pending.values()]
        return prompt_text(self.user, self.room, pending, self._connected())

    def status(self) -> FormattedText:
        """The status bar under the input."""
        return status_text(self.user, self.room, self.server, self._connected(), len(self.pending))

    # -- typed lines ---------------------------------------------------------------

    def on_line(self, line: str) -> bool:
        """Act on one typed line; False when the user asked to leave."""
        try:
            command = parse(line)
        except InvalidInput as error:
            self._show([error_line(str(error))])
            return True
        if command is None:
            return True
        if isinstance(command, Quit):
            return False
        if isinstance(command, Help):
            self._show([info_line(text) for text in HELP.splitlines()])
        elif isinstance(command, Say):
            self._next_id += 1
            outgoing = Outgoing(self._next_id, command.text, command.kind)
            self.pending[outgoing.id] = outgoing
            self._submit(outgoing)
            self._redraw()
        elif isinstance(command, History):
            if self.oldest is None:
                self._show([info_line("no earlier messages")])
            else:
                self._submit(Earlier(command.count, self.oldest))
        else:
            self._submit(command)
        return True

    # -- worker events -------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Show what the worker reported."""
        if isinstance(event, Joined):
            self.room = event.room
            self.oldest = event.page[0] if event.page else None
            lines = self._lines(event.page)
            count = len(event.page)
            shown = f"the last {count} messages above" if count else "no messages yet"
            lines.append(
                info_line(
                    f"you are in {event.shown or '#' + event.room} ({shown}; "
                    "/history N for earlier ones, "
                    "/help for commands)"
                )
            )
            self._show(lines)
        elif isinstance(event, Arrived):
            self._show_messages(event.messages)
        elif isinstance(event, Landed):
            self.pending.pop(event.id, None)
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
        else:
            assert isinstance(event, Problem)
            self._show([error_line(event.text)])

    def _show_messages(self, messages: Sequence[Message]) -> None:
        if messages and self.oldest is None:
            self.oldest = messages[0]
        if messages:
            self._show(self._lines(messages))

    def _show_earlier(self, event: EarlierPage) -> None:
        if event.before.room != self.room:
            return  # answered after a /join: no longer about what is on screen
        when = stamp(event.before.time, self._clock())
        if not event.messages:
            self._show([info_line(f"no messages before {when}")])
            return
        self.oldest = event.messages[0]
        lines = [info_line(f"{len(event.messages)} earlier messages, before {when}:")]
        lines += self._lines(event.messages)
        lines.append(info_line("end of earlier messages"))
        self._show(lines)

    def _lines(self, messages: Sequence[Message]) -> list[FormattedText]:
        now = self._clock()
        return [message_line(message, self.user, now) for message in messages]


async def _prompt_loop(screen: ChatScreen) -> None:
    """One prompt application for the whole chat: Enter hands the line to the
    screen and clears the input, without leaving the application, so the terminal
    stays in raw mode from start to end (see `print_lines`)."""
    # erase_when_done: on leaving, the prompt and status bar are not left behind.
    session: PromptSession[str] = PromptSession(style=STYLE, erase_when_done=True)

    def accept(buffer: Buffer) -> bool:
        if not screen.on_line(buffer.text):
            get_app().exit()
        return False  # clear the input (the line goes to the input history)

    session.default_buffer.accept_handler = accept
    with patch_stdout():
        try:
            await session.prompt_async(
                screen.prompt, bottom_toolbar=screen.status, refresh_interval=REFRESH_SECONDS
            )
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C
            pass


async def chat(
    open_client: Callable[[], ChatClient],
    user: str,
    room: str,
    server: str,
    *,
    show: Callable[[Sequence[FormattedText]], None] = print_lines,
    heartbeat_every: float = 20.0,
    give_up_after: float = 120.0,
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
    screen = ChatScreen(user, server, worker.submit, worker.is_connected, show=show)
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


def run_chat(args: argparse.Namespace) -> int:
    """`chatzeo chat`: ``args`` has ``server``, ``wait``, ``room`` and ``name``."""
    user = check_user_name(args.name)
    room = check_room_name(args.room)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise ChatError("chatzeo chat needs a terminal; scripts can use chatzeo send and tail")
    tls = getattr(args, "ssl_context", None) or context_from_options(
        args.tls_cert, args.tls_key, args.tls_ca)
    db = open_db(args.server, wait=args.wait, ssl=tls)
    finished = True
    try:
        finished = asyncio.run(chat(lambda: ChatClient(db, user), user, room, str(args.server)))
    finally:
        if finished:  # otherwise the worker still uses it; exiting ends it
            db.close()
    return 0

