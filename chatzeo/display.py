"""How the terminal client draws things: messages, notices, pending messages, the status bar.

Every function returns prompt_toolkit formatted text (a list of ``(style, text)``
fragments), so the terminal never parses what it prints for markup. Every string
that came from the database or from typed input passes through
`chatzeo.sanitize.clean` here, in one place, so no escape sequence any client
stored can reach the terminal.

Pure functions; the terminal's UI thread calls them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.styles import Style

from .message import Message
from .sanitize import clean

__all__ = [
    "STYLE",
    "OWN_MARK",
    "message_line",
    "info_line",
    "error_line",
    "prompt_text",
    "status_text",
    "stamp",
]

STYLE = Style.from_dict(
    {
        "time": "#888888",
        "author": "bold",
        "own": "bold ansigreen",
        "own-text": "ansigreen",
        "action": "italic",
        "info": "ansicyan",
        "error": "bold ansired",
        "pending": "#888888 italic",
        "not-sent": "ansired",
        "prompt": "bold",
        "bottom-toolbar": "noreverse bg:#303030 #ffffff",
        "status.ok": "ansigreen",
        "status.down": "bold ansiyellow",
    }
)

# Own messages carry a marker as well as a colour, so they stand apart on a
# terminal without colours too.
OWN_MARK = "\u00bb"  # »
_OTHER_MARK = " "


def stamp(when: float, now: float) -> str:
    """``HH:MM:SS`` for a time today, with the date in front for an older one."""
    local = time.localtime(when)
    if time.strftime("%Y-%m-%d", local) == time.strftime("%Y-%m-%d", time.localtime(now)):
        return time.strftime("%H:%M:%S", local)
    return time.strftime("%Y-%m-%d %H:%M:%S", local)


def message_line(message: Message, me: str | None, now: float) -> FormattedText:
    """One message: time, a mark for one's own, author and text, all sanitized."""
    own = me is not None and message.author == me
    author = clean(message.author or "anonymous")
    text = clean(message.text)
    fragments: list[tuple[str, str]] = [
        ("class:time", stamp(message.time, now)),
        ("class:own" if own else "", f" {OWN_MARK if own else _OTHER_MARK} "),
    ]
    author_style = "class:own" if own else "class:author"
    text_style = "class:own-text" if own else ""
    if message.kind == "action":
        fragments += [
            ("class:action", "* "),
            (f"{author_style} class:action", author),
            (f"{text_style} class:action", f" {text}"),
        ]
    else:
        fragments += [(author_style, f"<{author}>"), (text_style, f" {text}")]
    return FormattedText(fragments)


def info_line(text: str) -> FormattedText:
    """A notice from the client itself (command output, room changes)."""
    return FormattedText([("class:info", f"-- {clean(text)}")])


def error_line(text: str) -> FormattedText:
    """A one-line error, e.g. for a refused input."""
    return FormattedText([("class:error", f"!! {clean(text)}")])


def prompt_text(
    user: str, room: str, pending: Iterable[tuple[str, str]], connected: bool
) -> FormattedText:
    """The prompt: one line per message still waiting to be sent, then ``[#room] user>``.

    ``pending`` holds ``(kind, text)`` pairs, oldest first.
    """
    state = "sending" if connected else "waiting for the server"
    fragments: list[tuple[str, str]] = []
    for kind, text in pending:
        shown = f"* {user} {text}" if kind == "action" else text
        fragments.append(("class:pending", f"   (pending, {state}) {clean(shown)}\n"))
    fragments.append(("class:prompt", f"[#{clean(room)}] {clean(user)}> "))
    return FormattedText(fragments)


def status_text(user: str, room: str, server: str, connected: bool, pending: int) -> FormattedText:
    """The bottom bar: room, user, server and whether the connection is up."""
    fragments: list[tuple[str, str]] = [
        ("", f" #{clean(room)} | {clean(user)} @ {clean(server)} | "),
        ("class:status.ok", "connected")
        if connected
        else ("class:status.down", "reconnecting..."),
    ]
    if pending:
        fragments.append(("", f" | {pending} pending"))
    fragments.append(("", " | /help "))
    return FormattedText(fragments)
