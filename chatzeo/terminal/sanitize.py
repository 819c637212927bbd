"""Making untrusted text safe to draw on a terminal.

Any client can store any text, so every author and message from the database passes
through `clean` before it reaches a terminal: control characters (C0, DEL, C1, so
every escape sequence's introducer) and the invisible format characters that reorder
or hide text (bidirectional overrides, zero-width spaces, stray joiners) are shown as
visible ``\\xNN`` / ``\\uNNNN`` / ``\\UNNNNNNNN`` escapes instead of being sent to the terminal.

Emoji sequences are the exception: a zero-width joiner between two pictographs
(``👨‍👩‍👧``, ``🏳️‍🌈``) and the tag characters of a subdivision flag (``🏴`` + tags +
cancel tag) are format characters too, but inside such a sequence they only make
the pictographs one glyph, so they are kept there (Unicode's emoji ZWJ and tag
sequences, UTS #51; clusters as UAX #29 draws them, by `wcwidth.iter_graphemes`).
A joiner anywhere else, and every bidirectional control, stays escaped. Variation
selectors, skin-tone modifiers and regional indicators are not format characters
and pass as they are.

Pure functions; any thread may call them.
"""

from __future__ import annotations

import bisect
import unicodedata
from collections.abc import Iterator

from wcwidth import iter_graphemes
from wcwidth.table_grapheme import EXTENDED_PICTOGRAPHIC

__all__ = ["clean", "is_clean", "graphemes"]

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_NEWLINE_MARK = " \u23ce "  # the return symbol, so one message stays one line
_ZWJ = "\u200d"
_TAGS = range(0xE0020, 0xE007F)  # TAG SPACE .. TAG TILDE
_CANCEL_TAG = "\U000e007f"
_PICTOGRAPH_STARTS = [start for start, _ in EXTENDED_PICTOGRAPHIC]


def _pictograph(char: str) -> bool:
    code = ord(char)
    index = bisect.bisect_right(_PICTOGRAPH_STARTS, code) - 1
    return index >= 0 and code <= EXTENDED_PICTOGRAPHIC[index][1]


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    # Zl/Zp (U+2028, U+2029) are line breaks to some terminals: one message, one line.
    return unicodedata.category(char) in _UNSAFE_CATEGORIES and char != "\t"


def graphemes(text: str) -> Iterator[str]:
    """The user-perceived characters of ``text`` (UAX #29 extended grapheme clusters)."""
    return iter_graphemes(text)


def _kept_in_sequence(cluster: str) -> set[int]:
    """Indexes of the format characters of ``cluster`` that belong to an emoji
    ZWJ or tag sequence (see the module docstring)."""
    kept: set[int] = set()
    if not _pictograph(cluster[0]):
        return kept
    for index, char in enumerate(cluster):
        if char == _ZWJ and index + 1 < len(cluster) and _pictograph(cluster[index + 1]):
            kept.add(index)
    tags = [index for index, char in enumerate(cluster) if ord(char) in _TAGS]
    end = cluster.find(_CANCEL_TAG)
    # A tag sequence is base + tags + cancel tag, its base one emoji with at most a
    # modifier or selector (UTS #51): no format character before the tags, or
    # escaping it would strand the tags on the escape's text (not idempotent).
    if (
        tags
        and end > tags[-1]
        and tags == list(range(tags[0], end))
        and not any(_unsafe(char) for char in cluster[1 : tags[0]])
    ):
        kept.update(tags)
        kept.add(end)
    return kept


def _pieces(text: str) -> Iterator[tuple[str, bool]]:
    """Each character of ``text`` and whether it may reach a terminal as it is."""
    if _ZWJ not in text and not any(ord(char) >= 0xE0000 for char in text):
        for char in text:  # the common case: no sequence to look at
            yield char, not _unsafe(char)
        return
    for cluster in iter_graphemes(text):
        kept = _kept_in_sequence(cluster) if len(cluster) > 1 else set()
        for index, char in enumerate(cluster):
            yield char, index in kept or not _unsafe(char)


def clean(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every unsafe character escaped; tabs become spaces.

    Newlines become a visible mark unless ``keep_newlines``.
    """
    out = []
    for char, safe in _pieces(text):
        if char == "\n":
            out.append("\n" if keep_newlines else _NEWLINE_MARK)
        elif char == "\t":
            out.append("    ")
        elif not safe:
            out.append(_escape(char))
        else:
            out.append(char)
    return "".join(out)


def is_clean(text: str) -> bool:
    """True if ``text`` holds nothing a terminal would interpret (newlines allowed)."""
    return all(safe or char == "\n" for char, safe in _pieces(text))
