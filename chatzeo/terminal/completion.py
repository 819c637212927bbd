"""Tab completion in `chatzeo chat`: nicks present in the room, commands, room names.

`ChatCompleter` is a prompt_toolkit `Completer` over what the screen already knows
(`chatzeo.terminal.app.ChatScreen`: who is present in each open room, the open rooms and
the rooms listed by the server), so completing never asks the server anything.

- ``/jo`` completes a command name (``/join ``);
- after ``/join``, ``/switch`` or ``/part``, a room name (``#`` optional);
- any other word completes a nick present in the current room, with ``: `` after it
  when it is the first word (addressing someone, which mentions them), and with the
  ``@`` kept when the word started with one.

Runs in the UI thread, like the screen it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from .commands import COMMAND_NAMES, ROOM_COMMANDS

__all__ = ["ChatCompleter"]


class ChatCompleter(Completer):
    """Completes from ``nicks()``, ``rooms()`` and the command names."""

    def __init__(
        self, nicks: Callable[[], Iterable[str]], rooms: Callable[[], Iterable[str]]
    ) -> None:
        self._nicks = nicks
        self._rooms = rooms

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterator[Completion]:
        before = document.text_before_cursor
        if "\n" in before:
            before = before.rsplit("\n", 1)[1]
        word = before.rsplit(" ", 1)[-1]
        first_word = " " not in before
        if before.startswith("/") and first_word:
            typed = word[1:].lower()
            for name in COMMAND_NAMES:
                if name.startswith(typed):
                    yield Completion(f"/{name} ", start_position=-len(word))
            return
        command = before[1:].split(" ", 1)[0].lower() if before.startswith("/") else ""
        if command in ROOM_COMMANDS and before.count(" ") == 1:
            typed = word.removeprefix("#").casefold()
            for room in sorted(set(self._rooms())):
                if room.casefold().startswith(typed):
                    yield Completion(room, start_position=-len(word))
            return
        at = word.startswith("@")
        typed = word.removeprefix("@").casefold()
        if not typed and not at:
            return
        for nick in sorted(set(self._nicks())):
            if nick.casefold().startswith(typed):
                text = f"@{nick}" if at else nick
                if first_word and not at:
                    text += ": "
                yield Completion(text, start_position=-len(word))
