"""Editing the chat's input line by user-perceived characters, not code points.

An emoji such as ``👨‍👩‍👧`` is five code points (three pictographs, two zero-width
joiners) but one glyph. prompt_toolkit moves the cursor and deletes by code point
and measures each code point on its own, so the cursor could stop inside the
emoji (the hidden joiners then sat after it) and the line was measured six columns
wide where the terminal draws two: the prompt was garbled. Two pieces fix that:

`grapheme_bindings`
    Left, Right, Backspace and Delete move over and delete whole grapheme clusters
    (UAX #29, `wcwidth.iter_graphemes`), so the cursor never lands inside one.

`GraphemeWidths` (an input processor)
    Makes prompt_toolkit draw each emoji ZWJ sequence, flag (two regional
    indicators) and tag sequence as one cell of the width `wcwidth.width` gives the
    whole cluster. prompt_toolkit builds a cell per code point and merges only
    zero-width code points into the previous cell; the processor marks the
    cluster's first code point and the rest with style classes of their own, and
    the character cache prompt_toolkit builds cells through gives cells so marked
    the width the cluster needs (the rest zero, so they merge into one cell). This
    relies on prompt_toolkit 3.0's ``_CHAR_CACHE`` in ``layout.screen``, as
    `chatzeo.terminal.app.print_lines` relies on its renderer.

    Other clusters keep prompt_toolkit's own measure: terminals disagree about a
    skin-tone modifier (tmux 3.3a draws ``👍🏽`` four columns wide, kitty, WezTerm and
    foot two) and about a variation selector 16 (``❤️``: tmux one column, the others
    two), and prompt_toolkit's sum matches tmux there. A terminal that draws a ZWJ
    sequence as its separate pictographs (xterm) still misplaces the cursor after
    one; wcwidth's width is what the Unicode emoji standard prescribes.

Runs in the UI thread, inside the prompt application.
"""

from __future__ import annotations

from prompt_toolkit.application import get_app
from prompt_toolkit.document import Document
from prompt_toolkit.filters import Condition
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import screen
from prompt_toolkit.layout.processors import Processor, Transformation, TransformationInput
from prompt_toolkit.layout.screen import Char
from wcwidth import width as cluster_width

from .sanitize import graphemes

__all__ = ["grapheme_bindings", "GraphemeWidths", "boundaries", "joined_cluster"]

# Style classes that mark a cluster's cells: its first code point (and the cell it
# grows into) as "w1"/"w2" columns wide, the rest as merged into it.
_BASE = "class:grapheme-w"
_TAIL = "class:grapheme-tail"
_ZWJ = "\u200d"


def boundaries(text: str) -> list[int]:
    """Every index of ``text`` where a grapheme cluster starts, and ``len(text)``."""
    points = [0]
    for cluster in graphemes(text):
        points.append(points[-1] + len(cluster))
    return points


def _previous(document: Document) -> int:
    """Where the cluster before the cursor starts (the cursor if at the start)."""
    line_start = document.cursor_position - document.cursor_position_col
    line = document.current_line
    column = document.cursor_position_col
    before = [point for point in boundaries(line) if point < column]
    return line_start + (before[-1] if before else column)


def _next(document: Document) -> int:
    """Where the cluster after the cursor ends (the cursor if at the end)."""
    line_start = document.cursor_position - document.cursor_position_col
    line = document.current_line
    column = document.cursor_position_col
    after = [point for point in boundaries(line) if point > column]
    return line_start + (after[0] if after else column)


def grapheme_bindings() -> KeyBindings:
    """Left, Right, Backspace and Delete by grapheme cluster (see the module docstring)."""
    bindings = KeyBindings()
    at_line = Condition(lambda: get_app().current_buffer.selection_state is None)

    @bindings.add("left", filter=at_line)
    def _left(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        buffer.cursor_position = _previous(buffer.document)

    @bindings.add("right", filter=at_line)
    def _right(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        buffer.cursor_position = _next(buffer.document)

    @bindings.add("backspace", filter=at_line)
    @bindings.add("c-h", filter=at_line)
    def _backspace(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        start = _previous(buffer.document)
        if start < buffer.cursor_position:
            buffer.delete_before_cursor(buffer.cursor_position - start)

    @bindings.add("delete", filter=at_line)
    def _delete(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        end = _next(buffer.document)
        if end > buffer.cursor_position:
            buffer.delete(end - buffer.cursor_position)

    return bindings


def joined_cluster(cluster: str) -> bool:
    """Whether ``cluster`` is one glyph that prompt_toolkit would split into several
    cells: an emoji ZWJ sequence, a flag or a tag sequence (module docstring)."""
    if len(cluster) < 2:
        return False
    if _ZWJ in cluster[1:-1] or any(0xE0020 <= ord(char) <= 0xE007F for char in cluster):
        return True
    indicators = sum(1 for char in cluster if 0x1F1E6 <= ord(char) <= 0x1F1FF)
    return indicators == 2


class GraphemeWidths(Processor):
    """See the module docstring."""

    def __init__(self) -> None:
        _install_char_factory()

    def apply_transformation(self, transformation_input: TransformationInput) -> Transformation:
        fragments = []
        for fragment in transformation_input.fragments:
            style, text = fragment[0], fragment[1]
            if len(text) < 2 or "[ZeroWidthEscape]" in style:
                fragments.append(fragment)
                continue
            for cluster in graphemes(text):
                if not joined_cluster(cluster):
                    fragments.append((style, cluster))
                    continue
                columns = min(max(cluster_width(cluster), 1), 2)
                fragments.append((f"{style} {_BASE}{columns}", cluster[0]))
                fragments.extend((f"{style} {_TAIL}", char) for char in cluster[1:])
        # Same characters, same order: positions map one to one.
        return Transformation(fragments)


def _install_char_factory() -> None:
    """Make prompt_toolkit's character cache build the cells of a marked cluster
    with the marked widths (see the module docstring). The marks are style classes,
    found with ``in`` because the window appends classes of its own (such as
    ``class:last-line``) after the processors ran. Idempotent."""
    cache = screen._CHAR_CACHE
    if getattr(cache.get_value, "chatzeo", False):
        return
    plain = cache.get_value

    def make(text: str, style: str) -> Char:
        char = plain(text, style)
        if _BASE not in style and _TAIL not in style:
            return char
        if _TAIL in style:
            char.width = 0  # merged into the cell of the cluster's first code point
        elif f"{_BASE}2" in style:
            char.width = 2
        else:
            char.width = 1
        return char

    make.chatzeo = True  # type: ignore[attr-defined]
    cache.get_value = make
