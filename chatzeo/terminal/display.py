"""How the terminal client draws things: messages, notices, pending messages, the status bar.

Every function returns prompt_toolkit formatted text (a list of ``(style, text)``
fragments), so the terminal never parses what it prints for markup. Every string
that came from the database or from typed input passes through
`chatzeo.terminal.sanitize.clean` here, in one place, so no escape sequence any client
stored can reach the terminal.

Long messages are wrapped here too (`wrap`), at word boundaries, measuring each
grapheme cluster as the terminal draws it (`wcwidth`), with continuation lines
indented under the start of the text, so a wrapped message still reads as one.

Pure functions; the terminal's UI thread calls them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.styles import Style
from wcwidth import width as text_width

from ..message import Message
from .sanitize import clean, graphemes

__all__ = [
    "STYLE",
    "OWN_MARK",
    "message_line",
    "plain_line",
    "room_label",
    "info_line",
    "error_line",
    "prompt_text",
    "status_text",
    "stamp",
    "plural",
    "day_line",
    "message_lines",
    "wrap",
    "catch_up_lines",
    "activity_text",
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
        "day": "bold ansicyan",
        "frame": "bold ansicyan",
        "not-sent": "ansired",
        "prompt": "bold",
        "bottom-toolbar": "noreverse bg:#303030 #ffffff",
        "status.ok": "ansigreen",
        "status.down": "bold ansiyellow",
        "mention": "bold ansiyellow",
        "catch-up": "bold ansimagenta",
        "status.activity": "bold",
        "status.mention": "bold ansiyellow",
        "presence": "#888888",
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


def plural(count: int, noun: str) -> str:
    """``1 message``, ``2 messages``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def day_line(when: float) -> FormattedText:
    """The line that opens a day's messages: ``-- Monday 23 November 2026 --``."""
    local = time.localtime(when)
    day = time.strftime("%A %d %B %Y", local).replace(" 0", " ", 1)
    return FormattedText([("class:day", f"-- {day} --")])


def message_lines(
    message: Message, own: bool, now: float, width: int, mention: bool = False
) -> list[FormattedText]:
    """`message_line`, wrapped to ``width`` columns with continuation lines indented
    under the start of the text. Each line of a multi-line message starts a new
    line, indented the same way."""
    parts = message.text.split("\n")
    first = message_line(message, own, now, mention, text=parts[0])
    # The last fragment is the text (" text"); it starts one column after the rest.
    indent = text_width("".join(text for _, text, *_ in first[:-1])) + 1
    lines = wrap(first, width, indent)
    style = first[-1][0]
    for part in parts[1:]:
        shown = FormattedText([("", " " * indent), (style, clean(part))])
        lines += wrap(shown, width, indent)
    return lines


def message_line(
    message: Message,
    own: bool,
    now: float,
    mention: bool = False,
    text: str | None = None,
    *,
    marks: bool = True,
) -> FormattedText:
    """One message: time, a mark if this connection sent it, author and text, all
    sanitized. "Own" is decided by the caller from the ids it sent, never by the
    author name (anyone may use any name without TLS). A message that mentions
    the reader is highlighted, and marked with ``!`` for terminals without colour.
    ``text`` replaces the message's text (its first line, for `message_lines`).
    Without ``marks`` the mark column is left out (``HH:MM:SS <bob> hi``: the
    scriptable commands' line, `plain_line`)."""
    author = clean(message.author or "anonymous")
    text = clean(message.text if text is None else text)
    fragments: list[tuple[str, str]] = [
        ("class:time", stamp(message.time, now)),
        ("class:own" if own else "", f" {OWN_MARK if own else _OTHER_MARK} "),
    ]
    if not marks:
        fragments[1] = ("", " ")
    elif mention and not own:
        fragments[1] = ("class:mention", " ! ")
    author_style = "class:own" if own else "class:author"
    text_style = "class:own-text" if own else ("class:mention" if mention else "")
    if message.kind == "action":
        fragments += [
            ("class:action", "* "),
            (f"{author_style} class:action", author),
            (f"{text_style} class:action", f" {text}"),
        ]
    else:
        fragments += [(author_style, f"<{author}>"), (text_style, f" {text}")]
    return FormattedText(fragments)


def room_label(key: str) -> str:
    """An open room as shown, from its key: ``#lobby`` for the public room
    ``lobby``; a private room's key is its label already (``#plans (private)``,
    ``@bob``: `chatzeo.client.ChatClient.open_rooms`), which no public name can
    equal (names hold no ``#`` or ``@``). Not sanitized: callers clean it."""
    return key if key[:1] in "#@" else f"#{key}"


def plain_line(message: Message, now: float) -> str:
    """`message_line` as plain, terminal-safe text without marks, for commands whose
    output goes to scripts and pipes (``chatzeo tail``, ``history``):
    ``HH:MM:SS <author> text``, the date in front for a message not from today."""
    return "".join(text for _, text, *_ in message_line(message, False, now, marks=False))


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
    fragments.append(("class:prompt", f"[{clean(room_label(room))}] {clean(user)}> "))
    return FormattedText(fragments)


def activity_text(activity: Sequence[tuple[int, str, int, int]]) -> str:
    """The activity list: ``2:dev(3) 4:ops(5,@1)`` for rooms numbered 2 and 4 with
    3 and 5 unread messages, one of which mentions the reader. ``activity`` holds
    ``(number, room, unread, mentions)`` for the rooms that have any."""
    shown = []
    for number, room, unread, mentions in activity:
        count = f"{unread},@{mentions}" if mentions else f"{unread}"
        shown.append(f"{number}:{clean(room)}({count})")
    return " ".join(shown)


def status_text(
    user: str,
    room: str,
    server: str,
    connected: bool,
    pending: int,
    width: int = 1000,
    activity: str = "",
    topic: str = "",
) -> FormattedText:
    """The bottom bar: the connection state, room, activity list, topic, pending
    count, user, server.

    It fits ``width`` columns by dropping the least useful parts first (``/help``,
    the server, the user, the topic, then cutting the activity list and the room
    name): the connection state and the pending count always stay.
    """
    state = ("class:status.ok", "connected") if connected else (
        "class:status.down", "reconnecting...")
    room_part = clean(room_label(room))
    if activity:
        room_part += f" [{activity}]"
    shown_topic = f"topic: {_cut(clean(topic), 40)}" if topic else ""
    parts = [room_part, f"{clean(user)} @ {clean(server)}"]
    with_topic = [room_part, shown_topic, parts[1]] if topic else parts
    tail = [f"{pending} pending"] if pending else []
    for middle, extra in (
        (with_topic, ["/help"]), (with_topic, []), (parts, []), (parts[:1], [])
    ):
        text = _status(middle, state, tail + extra)
        if text_width("".join(t for _, t in text)) <= width:
            return FormattedText(text)
    fixed = text_width("".join(t for _, t in _status([], state, tail)))
    cut = _cut(room_part, width - fixed - 3)  # 3: the " | " after the room
    return FormattedText(_status([cut] if len(cut) > 2 else [], state, tail))


def _status(
    middle: Sequence[str], state: tuple[str, str], tail: Sequence[str]
) -> list[tuple[str, str]]:
    # Leading space, parts joined by " | ", the state styled, the tail after it.
    fragments: list[tuple[str, str]] = [("", " " + "".join(f"{p} | " for p in middle)), state]
    fragments += [("", f" | {part}") for part in tail]
    fragments.append(("", " "))
    return fragments


def _cut(text: str, columns: int) -> str:
    """``text`` cut to ``columns`` columns, ending in an ellipsis if it was cut."""
    if text_width(text) <= columns:
        return text
    out, used = [], 0
    for cluster in graphemes(text):
        size = max(text_width(cluster), 0)
        if used + size > columns - 1:
            break
        out.append(cluster)
        used += size
    return "".join(out) + "\u2026" if out else ""


def catch_up_lines(new: int, lost: int) -> list[FormattedText]:
    """The lines above what came while one was away: ``— 12 new since you left —``,
    and how many retention removed before they were read, never skipped silently."""
    lines = []
    if lost:
        lines.append(FormattedText([("class:catch-up", (
            f"\u2014 {plural(lost, 'message')} lost to retention since you left "
            "(the room keeps only its newest) \u2014"))]))
    if new:
        lines.append(FormattedText([
            ("class:catch-up", f"\u2014 {new} new since you left \u2014")]))
    return lines


def wrap(line: FormattedText, width: int, indent: int) -> list[FormattedText]:
    """``line`` broken into lines of at most ``width`` columns, at spaces where it
    can be, continuation lines starting with ``indent`` spaces.

    A word longer than a whole line is cut between grapheme clusters (never inside
    one, so an emoji sequence stays whole). Styles carry over to every piece.
    """
    if width <= 0 or indent >= width - 10:
        indent = 0  # too narrow to indent usefully: use the whole width
    if width <= 1:
        return [line]
    lines: list[list[tuple[str, str]]] = [[]]
    used = 0
    for style, word in _words(line):
        size = text_width(word) if word != " " else 1
        if word == " ":
            if used + 1 <= width:
                lines[-1].append((style, " "))
                used += 1
            continue
        if used + size > width and used > indent:
            # Start a new line; trailing spaces are dropped from the full one.
            while lines[-1] and lines[-1][-1][1] == " ":
                lines[-1].pop()
            lines.append([("", " " * indent)] if indent else [])
            used = indent
        if used + size <= width:
            lines[-1].append((style, word))
            used += size
            continue
        for cluster in graphemes(word):  # longer than a line: cut it
            cluster_size = max(text_width(cluster), 0)
            if used + cluster_size > width:
                lines.append([("", " " * indent)] if indent else [])
                used = indent
            lines[-1].append((style, cluster))
            used += cluster_size
    return [FormattedText(fragments) for fragments in lines]


def _words(line: FormattedText) -> list[tuple[str, str]]:
    """The fragments of ``line`` split into single spaces and runs of non-spaces."""
    words: list[tuple[str, str]] = []
    for style, text, *_ in line:
        start = 0
        for index, char in enumerate(text):
            if char == " ":
                if index > start:
                    words.append((style, text[start:index]))
                words.append((style, " "))
                start = index + 1
        if start < len(text):
            words.append((style, text[start:]))
    return words
