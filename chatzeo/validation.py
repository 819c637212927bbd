"""Checks run on every name and every message text before anything is written.

Each check returns the normalised value or raises an `InvalidInput` subclass whose
message names what was wrong, in one line.
"""

from __future__ import annotations

import re

from .errors import InvalidMessage, InvalidName

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_ROOM_NAME",
    "MAX_USER_NAME",
    "check_room_name",
    "check_user_name",
    "check_text",
    "check_topic",
    "decode_text",
    "MAX_TOPIC_BYTES",
]

MAX_MESSAGE_BYTES = 4096
MAX_ROOM_NAME = 64
MAX_USER_NAME = 32
# IRC servers commonly allow 390 bytes (TOPICLEN); a topic is one line of a status bar.
MAX_TOPIC_BYTES = 390

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
# Unicode's control characters (category Cc: C0, DEL, C1) but tab and newline, the
# only ones a message may carry. One regex search: this runs on every post.
_FORBIDDEN_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _check_name(kind: str, name: object, limit: int) -> str:
    if not isinstance(name, str):
        raise InvalidName(kind, name, "must be a string")
    if not name:
        raise InvalidName(kind, name, "is empty")
    if len(name) > limit:
        raise InvalidName(kind, name[:20] + "...", f"longer than {limit} characters")
    if not _NAME.match(name):
        raise InvalidName(
            kind, name, "use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
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
    if not isinstance(text, str):
        raise InvalidMessage(f"message text must be a string, not {type(text).__name__}")
    text = text.rstrip("\r\n")
    if not text.strip():
        raise InvalidMessage("message is empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise InvalidMessage(
            f"message is not valid UTF-8 (character {error.start} is a lone surrogate)"
        ) from None
    if size > MAX_MESSAGE_BYTES:
        raise InvalidMessage(f"message is {size} bytes; the limit is {MAX_MESSAGE_BYTES}")
    forbidden = _FORBIDDEN_CONTROL.search(text)
    if forbidden is not None:
        char = forbidden.group()
        what = "a NUL byte" if char == "\0" else f"control character U+{ord(char):04X}"
        raise InvalidMessage(f"message contains {what} at position {forbidden.start()}")
    return text


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


def decode_text(data: bytes) -> str:
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
    return check_text(text)
