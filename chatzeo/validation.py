"""Checks run on every name and every message text before anything is written.

Each check returns the normalised value or raises an `InvalidInput` subclass whose
message names what was wrong, in one line.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidMessage, InvalidName
from .records import (
    MAX_ROOM_NAME,
    MAX_TEXT_BYTES,
    MAX_TOPIC_BYTES,
    MAX_USER_NAME,
    name_problem,
    text_problem,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_ROOM_NAME",
    "MAX_USER_NAME",
    "check_room_name",
    "check_user_name",
    "check_text",
    "check_topic",
    "decode_text",
    "CheckedText",
    "checked_text",
    "MAX_TOPIC_BYTES",
]

# The rules themselves live in chatzeo.records, which the server and readers share.
MAX_MESSAGE_BYTES = MAX_TEXT_BYTES


def _check_name(kind: str, name: object, limit: int) -> str:
    problem = name_problem(kind, name, limit)
    if problem is not None:
        shown = name[:20] + "..." if isinstance(name, str) and len(name) > limit else name
        raise InvalidName(kind, shown, problem)
    assert isinstance(name, str)
    return name


def check_room_name(name: object) -> str:
    """Return the room name, without one leading '#' (as users type it), or raise."""
    if isinstance(name, str) and name.startswith("#"):
        name = name[1:]
    return _check_name("room", name, MAX_ROOM_NAME)


def check_user_name(name: object) -> str:
    """Return the user name unchanged, or raise `InvalidName`."""
    return _check_name("user", name, MAX_USER_NAME)


def check_text(text: object) -> str:
    """Return a message text that may be stored, or raise `InvalidMessage`.

    Refused: non-strings, text that is empty or only whitespace, text that is not
    encodable as UTF-8 (lone surrogates), more than `MAX_MESSAGE_BYTES` bytes of UTF-8,
    NUL and every other control character but tab and newline (terminal escape
    sequences start with one). Trailing newlines are dropped.
    """
    if isinstance(text, str):
        text = text.rstrip("\r\n")
    problem = text_problem(text)
    if problem is not None:
        raise InvalidMessage(problem)
    assert isinstance(text, str)
    return text


_ISSUED = object()


class CheckedText(str):
    """A message text that passed `check_text` once, at the boundary where it came in
    (a typed line, ``chatzeo send``'s argument), so code further in (the terminal's
    worker, `ChatClient.send`, `ChatSession.add_message`) stores it without checking
    it again. Only `checked_text` and `decode_text` make one; a plain ``str`` is
    checked wherever it is posted, so library callers keep every check. Never
    stored: posting stores ``str(text)`` (and pickling one fails loudly)."""

    __slots__ = ()

    def __new__(cls, text: str, issued: object = None) -> CheckedText:
        if issued is not _ISSUED:
            raise TypeError("a CheckedText comes from chatzeo.validation.checked_text")
        return super().__new__(cls, text)

    def __reduce__(self) -> Any:
        raise TypeError("a CheckedText is not stored; store str(text)")


def checked_text(text: object) -> CheckedText:
    """`check_text`, marking the result as checked (`CheckedText`)."""
    if isinstance(text, CheckedText):
        return text
    return CheckedText(check_text(text), _ISSUED)


def plain_text(text: str) -> str:
    """The plain ``str`` to store for ``text``: a `CheckedText` as it is (checked
    once already), anything else through `check_text`."""
    return str(text) if isinstance(text, CheckedText) else check_text(text)


def check_topic(text: object) -> str:
    """Return a room topic that may be stored (``""`` clears it), or raise
    `InvalidMessage`: one line of at most `MAX_TOPIC_BYTES` bytes, with the rules of
    `check_text` otherwise."""
    if isinstance(text, str) and not text.strip():
        return ""
    text = check_text(text)
    if "\n" in text:
        raise InvalidMessage("a topic is one line")
    size = len(text.encode("utf-8"))
    if size > MAX_TOPIC_BYTES:
        raise InvalidMessage(f"topic is {size} bytes; the limit is {MAX_TOPIC_BYTES}")
    return text


def decode_text(data: bytes) -> CheckedText:
    """Decode bytes read from a file or pipe as UTF-8 and check them as a message."""
    # Size first: input cut off at a read limit may end inside a UTF-8 sequence, and
    # "too big" is the true reason then, not "not UTF-8".
    size = len(data.rstrip(b"\r\n"))
    if size > MAX_MESSAGE_BYTES:
        raise InvalidMessage(f"message is more than {MAX_MESSAGE_BYTES} bytes (the limit)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidMessage(f"input is not valid UTF-8 (byte {error.start})") from None
    return checked_text(text)
