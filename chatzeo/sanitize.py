"""Making untrusted text safe to draw on a terminal.

Any client can store any text, so every author and message from the database passes
through `clean` before it reaches a terminal: control characters (C0, DEL, C1, so
every escape sequence's introducer) and the invisible format characters that reorder
or hide text (bidirectional overrides, zero-width joiners) are shown as visible
``\\xNN`` / ``\\uNNNN`` escapes instead of being sent to the terminal.
"""

from __future__ import annotations

import unicodedata

__all__ = ["clean", "is_clean"]

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_NEWLINE_MARK = " \u23ce "  # the return symbol, so one message stays one line


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _unsafe(char: str) -> bool:
    # Zl/Zp (U+2028, U+2029) are line breaks to some terminals: one message, one line.
    return unicodedata.category(char) in _UNSAFE_CATEGORIES and char != "\t"


def clean(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every unsafe character escaped; tabs become spaces.

    Newlines become a visible mark unless ``keep_newlines``.
    """
    out = []
    for char in text:
        if char == "\n":
            out.append("\n" if keep_newlines else _NEWLINE_MARK)
        elif char == "\t":
            out.append("    ")
        elif _unsafe(char):
            out.append(_escape(char))
        else:
            out.append(char)
    return "".join(out)


def is_clean(text: str) -> bool:
    """True if ``text`` holds nothing a terminal would interpret (newlines allowed)."""
    return not any(_unsafe(char) for char in text if char != "\n")
