"""Reading stored records on the server without running any of their code.

A ZEO client sends pickles; ZODB's own loaders import whatever globals a pickle
names (`ZODB.ConflictResolution.find_global` even runs them). `decode` reads a
record as ``(dotted class name, state)`` instead: every global is checked with
`chatzeo.allowlist.is_allowed` and stands for itself as a token, persistent
references become `Ref`, and nothing is imported or called. A record that needs
more than plain data raises `Undecodable`.

`shape_of` reads a decoded BTree node or bucket as a `Shape` (its items, its
children and their separator keys, its next bucket), which is what the commit
rules (`chatzeo.server.rules`) and the index (`chatzeo.server.index`) compare.

Threads: pure functions; the server calls them in ZEO's asyncio loop thread, and
the two small caches of globals are thread-safe (`functools.lru_cache`).
"""

from __future__ import annotations

import functools
import io
import pickle
from dataclasses import dataclass
from typing import Any

from ..allowlist import is_allowed

__all__ = [
    "EMPTY_SHAPE",
    "ROOT_OID",
    "Z64",
    "Ref",
    "Shape",
    "Undecodable",
    "check_sorted",
    "decode",
    "load",
    "shape_of",
]

Z64 = b"\0" * 8
ROOT_OID = Z64


@dataclass(frozen=True, slots=True)
class Ref:
    """A persistent reference in a decoded record."""

    oid: bytes


class Undecodable(Exception):
    """A record this module cannot read as plain data; the message says why, as the
    end of a sentence that starts "a record ..."."""


@dataclass(frozen=True, slots=True)
class _Global:
    module: str
    name: str


@functools.lru_cache(maxsize=256)
def _global(module: str, name: str) -> _Global | None:
    return _Global(module, name) if is_allowed(module, name) else None


class _Opaque:
    """Stands for an object of a class chatzeo does not know, in a lenient decode:
    built and filled as plain data, so none of that class's code runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


@functools.lru_cache(maxsize=256)
def _opaque(module: str, name: str) -> type[_Opaque]:
    # A class of our own per name, since pickle's NEWOBJ needs a class; nothing of
    # ``module`` is imported.
    return type(f"opaque {module}.{name}", (_Opaque,), {"__module__": __name__})


class _Unpickler(pickle.Unpickler):
    lenient = False

    def find_class(self, module: str, name: str) -> Any:
        found = _global(module, name)
        if found is None:
            if self.lenient:
                return _opaque(module, name)  # a name only: nothing imported or run
            raise Undecodable(f"names {module}.{name}, which is not allowed")
        return found

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, bytes):
            return Ref(pid)
        if isinstance(pid, tuple) and pid and isinstance(pid[0], bytes):
            return Ref(pid[0])
        raise Undecodable("holds a weak or cross-database reference")


def decode(data: bytes, lenient: bool = False) -> tuple[str, Any]:
    """A stored record as ``(dotted class name, state)``, persistent references as `Ref`.

    Globals are checked with `chatzeo.allowlist.is_allowed` and never imported; a
    record that needs more than plain data raises `Undecodable`. ``lenient`` lets
    any global be *named* (an application's classes, referred to from the ZODB
    root); still nothing is imported or called.
    """
    try:
        unpickler = _Unpickler(io.BytesIO(data))
        unpickler.lenient = lenient
        meta = unpickler.load()
        state = unpickler.load()
    except Undecodable:
        raise
    except Exception as error:
        raise Undecodable(f"cannot be decoded ({type(error).__name__})") from None
    klass = meta[0] if isinstance(meta, tuple) and meta else meta
    if isinstance(klass, _Global):
        return f"{klass.module}.{klass.name}", state
    if (
        isinstance(klass, tuple)
        and len(klass) == 2
        and all(isinstance(part, str) for part in klass)
        and is_allowed(*klass)
    ):
        return f"{klass[0]}.{klass[1]}", state
    raise Undecodable("has no class chatzeo knows")


def load(storage: Any, oid: bytes) -> tuple[str, Any]:
    """The newest committed state of ``oid`` in ``storage``, decoded."""
    data, _ = storage.load(oid)
    return decode(data)


# -- BTree shapes --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """A BTree node or bucket: its items (bucket or inline tree), children, next link.

    ``link`` is a bucket's next bucket, or a tree node's first bucket.
    """

    items: dict[Any, Any]
    keys: tuple[Any, ...]  # the items' keys in stored order
    children: tuple[bytes, ...]
    separators: dict[bytes, Any]  # child oid -> the key before it (None for the first)
    link: bytes | None

    @property
    def empty(self) -> bool:
        return not self.items and not self.children


EMPTY_SHAPE = Shape({}, (), (), {}, None)


def _bucket_shape(state: Any) -> Shape:
    if state is None:
        return EMPTY_SHAPE
    if not isinstance(state, tuple) or not 1 <= len(state) <= 2:
        raise Undecodable("is not a bucket")
    flat = state[0]
    if not isinstance(flat, tuple) or len(flat) % 2:
        raise Undecodable("is not a bucket")
    keys = flat[0::2]
    link = state[1] if len(state) == 2 else None
    if link is not None and not isinstance(link, Ref):
        raise Undecodable("has a bad next bucket")
    try:
        items = dict(zip(keys, flat[1::2], strict=True))
    except TypeError:
        raise Undecodable("has unhashable items") from None
    return Shape(items, keys, (), {}, link.oid if link else None)


def _tree_shape(state: Any) -> Shape:
    if state is None:
        return EMPTY_SHAPE
    if not isinstance(state, tuple) or not 1 <= len(state) <= 2:
        raise Undecodable("is not a tree")
    if len(state) == 1:  # one bucket stored inside the tree
        if not isinstance(state[0], tuple) or len(state[0]) != 1:
            raise Undecodable("is not a tree")
        inline = _bucket_shape(state[0][0])
        return Shape(inline.items, inline.keys, (), {}, None)
    data, first = state
    if not isinstance(data, tuple) or not isinstance(first, Ref) or len(data) % 2 != 1:
        raise Undecodable("is not a tree")
    children = data[0::2]
    if not all(isinstance(child, Ref) for child in children):
        raise Undecodable("has a child that is not an object")
    separators = {child.oid: (data[2 * i - 1] if i else None) for i, child in enumerate(children)}
    return Shape({}, (), tuple(c.oid for c in children), separators, first.oid)


def shape_of(class_name: str, state: Any) -> Shape:
    """The `Shape` of a decoded BTree node (``...BTree``) or bucket (``...Bucket``).
    Raises `Undecodable` if ``state`` is not one."""
    if class_name.endswith("Bucket"):
        return _bucket_shape(state)
    return _tree_shape(state)


def check_sorted(shape: Shape) -> None:
    """Raise `Undecodable` unless ``shape``'s keys are distinct and ascending."""
    keys = shape.keys
    try:
        # Distinct (the items dict is as long) and in order: strictly ascending.
        if len(shape.items) != len(keys) or list(keys) != sorted(keys):
            raise Undecodable("has keys out of order")
    except TypeError:
        raise Undecodable("has keys that cannot be ordered") from None
