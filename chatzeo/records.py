"""What chatzeo stores: the one definition of every record's shape, type and size.

Every client of a ZEO server can store any state, so the shapes below are a
contract that three parties check against this module, and only this module:

- the server (`chatzeo.server.rules`, run by every `chatzeo serve`) refuses a commit
  whose records break it;
- readers (`chatzeo.message.Message.from_record`, `chatzeo.session`,
  `chatzeo.realm`, `chatzeo.client`) turn a record that breaks it, stored before
  (an old file, a plain ``runzeo``), into a visible placeholder instead of an
  exception;
- ``chatzeo check`` (`chatzeo.maintenance`) reports each one.

The records (each ``*_problem`` function returns None for a good value, else one
line saying what is wrong; none of them raises, whatever it is given)

    message     ``(id, author, text, kind)``: ``id`` 1-`MAX_ID` characters of
                ``[A-Za-z0-9._-]``; ``author`` None or a user name; ``text`` a
                message text (`text_problem`); ``kind`` an ``int`` index into `KINDS`
                (not a bool, not a float).
    key         a message's key: an ``int`` (not a bool) from 1 to `MAX_KEY`, the
                range of an ``LOBTree`` key.
    clock       a `chatzeo.session.RoomClock`'s state: ``head``, ``count`` ints >= 0,
                ``flushed`` None or an int >= 0, ``pending`` a tuple of at most
                `MAX_PENDING` ``(key, message)`` pairs with strictly increasing keys,
                none above ``head``; ``total`` (messages ever posted; older clocks
                lack it) None or an int from 0 to `MAX_KEY`; no other
                attribute.
    room        a `chatzeo.session.ChatSession`'s state: exactly `ROOM_FIELDS`, and
                `ROOM_OPTIONAL` if set; ``name`` a room name; ``max_messages`` None
                or an int from 1 to `MAX_KEY`; ``max_age`` None or a finite number
                of seconds > 0; ``topic`` None or ``(text, setter, time)``: one line
                of at most `MAX_TOPIC_BYTES` (``""`` once cleared), a user name, a
                finite number (`topic_problem`).
    user        a `chatzeo.realm.User`'s state: exactly `USER_FIELDS`, and
                `USER_OPTIONAL` if set; ``name`` a user name; ``last_connected`` a
                finite number; ``joined`` a tuple of at most `MAX_JOINED` distinct
                room names; ``markers`` None or a reference (the caller's to check).
    markers     a `chatzeo.markers.ReadMarkers`'s state: ``_keys`` and (newer ones)
                ``_positions``, each a dict of at most `MAX_JOINED` room names ->
                ints from 0 to `MAX_KEY` (`markers_problem`).
    presence    a room's ``presence`` item: lease id (like a message id) ->
                ``(user name, expiry)``.
    lease       a user's ``leases`` item: lease id -> ``(room name or None, expiry)``;
                expiry a finite number. The server also bounds it by time
                (`expiry_problem`) and counts a user's live leases.
    names       room names 1-`MAX_ROOM_NAME`, user names 1-`MAX_USER_NAME`
                characters of ``[A-Za-z0-9._-]``, starting with a letter or digit: so
                no control, format or space character can be in a name.

Sizes: a text is at most `MAX_TEXT_BYTES` bytes of UTF-8, so a clock record holds at
most `MAX_PENDING` of them; a record of chatzeo's graph is at most `MAX_RECORD_BYTES`
as a pickle (checked before it is decoded); the protocol layer bounds every record
and transaction as well.

Transaction extensions: a plain mapping of at most `MAX_EXTENSION_ITEMS` str keys
to bounded str, int, float, bool or None (`plain_extension`); a stored one is
decoded without naming any global (`stored_extension`).

Pure functions and constants; any thread may call them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .allowlist import safe_loads

__all__ = [
    "KINDS",
    "MAX_TEXT_BYTES",
    "MAX_ROOM_NAME",
    "MAX_USER_NAME",
    "MAX_ID",
    "MAX_KEY",
    "MAX_PENDING",
    "MAX_RECORD_BYTES",
    "FUTURE_SKEW",
    "ROOM_FIELDS",
    "ROOM_OPTIONAL",
    "USER_OPTIONAL",
    "MARKERS_FIELDS",
    "MAX_TOPIC_BYTES",
    "MAX_JOINED",
    "topic_problem",
    "joined_problem",
    "markers_problem",
    "USER_FIELDS",
    "CLOCK_FIELDS",
    "ROOT_FIELDS",
    "name_problem",
    "text_problem",
    "id_problem",
    "key_problem",
    "message_problem",
    "clock_problem",
    "room_problem",
    "user_problem",
    "root_problem",
    "presence_problem",
    "lease_problem",
    "expiry_problem",
    "number_problem",
    "MAX_EXTENSION_ITEMS",
    "MAX_EXTENSION_KEY",
    "MAX_EXTENSION_TEXT",
    "plain_extension",
    "stored_extension",
]

# A message's kind is stored as an index into this tuple.
KINDS = ("say", "action")
MAX_TEXT_BYTES = 4096
MAX_ROOM_NAME = 64
MAX_USER_NAME = 32
MAX_ID = 64
MAX_KEY = 2**63 - 1
# How many entries a room clock may hold. Posts flush from 2 * FLUSH (64) entries on,
# so honest clocks stay near 64 (a few more while concurrent posts race a flush);
# the bound keeps the record every post rewrites, and conflict resolution on it, small.
MAX_PENDING = 192
# The largest pickle of one record of chatzeo's graph, and so of any record the
# server's protocol accepts (`chatzeo.server.protocol`): a full clock of MAX_PENDING
# messages of MAX_TEXT_BYTES is about 0.8 MB; honest ones stay below 0.3 MB.
MAX_RECORD_BYTES = 1024 * 1024
# How far ahead of the server's clock a message key or a lease expiry may lie
# (seconds): writers' clocks may run that much ahead of the server's.
FUTURE_SKEW = 300.0
# A transaction's extension (its metadata mapping, stored by FileStorage as a pickle).
MAX_EXTENSION_ITEMS = 32
MAX_EXTENSION_KEY = 64
MAX_EXTENSION_TEXT = 1024

ROOM_FIELDS = frozenset({"name", "max_messages", "max_age", "_messages", "_clock", "presence"})
USER_FIELDS = frozenset({"name", "leases", "last_connected"})
# Attributes newer code sets (class defaults stand in for them in older records).
ROOM_OPTIONAL = frozenset({"topic"})
USER_OPTIONAL = frozenset({"joined", "markers"})
CLOCK_FIELDS = frozenset({"head", "count", "flushed", "pending", "total"})
MARKERS_FIELDS = frozenset({"_keys", "_positions"})
# IRC servers commonly allow 390 bytes (TOPICLEN); a topic is one line of a status bar.
MAX_TOPIC_BYTES = 390
# How many rooms one user may remember as joined, and keep read markers for.
MAX_JOINED = 512
ROOT_FIELDS = frozenset({"rooms", "users", "max_connections", "lease_seconds"})

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_ID = re.compile(r"[A-Za-z0-9._-]+\Z")
# Unicode's control characters (category Cc: C0, DEL, C1) but tab and newline, the
# only ones a message may carry. One regex search: this runs on every post and read.
FORBIDDEN_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _show(value: object) -> str:
    """A short, printable rendering of a hostile value for a problem line."""
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def name_problem(kind: str, name: object, limit: int) -> str | None:
    """What is wrong with ``name`` as a ``kind`` ("room", "user") name, if anything."""
    if not isinstance(name, str):
        return "must be a string"
    if not name:
        return "is empty"
    if len(name) > limit:
        return f"longer than {limit} characters"
    if not _NAME.match(name):
        return "use letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def _room_name_problem(name: object) -> str | None:
    problem = name_problem("room", name, MAX_ROOM_NAME)
    return None if problem is None else f"room name {_show(name)}: {problem}"


def _user_name_problem(name: object) -> str | None:
    problem = name_problem("user", name, MAX_USER_NAME)
    return None if problem is None else f"user name {_show(name)}: {problem}"


def text_problem(text: object) -> str | None:
    """What is wrong with ``text`` as a stored message text, if anything.

    Refused: non-strings, empty or whitespace-only text, lone surrogates (not
    UTF-8), more than `MAX_TEXT_BYTES` bytes of UTF-8, and every control character
    but tab and newline. The phrases are `chatzeo.validation.check_text`'s.
    """
    if type(text) is not str:
        return f"message text must be a string, not {type(text).__name__}"
    if not text or text.isspace():
        return "message is empty"
    surrogate = _SURROGATE.search(text)
    if surrogate is not None:
        return (
            f"message is not valid UTF-8 (character {surrogate.start()} is a lone surrogate)"
        )
    # A character is at most 4 bytes: short texts need no encoding to be measured.
    if len(text) * 4 > MAX_TEXT_BYTES:
        size = len(text.encode("utf-8"))
        if size > MAX_TEXT_BYTES:
            return f"message is {size} bytes; the limit is {MAX_TEXT_BYTES}"
    forbidden = FORBIDDEN_CONTROL.search(text)
    if forbidden is not None:
        char = forbidden.group()
        what = "a NUL byte" if char == "\0" else f"control character U+{ord(char):04X}"
        return f"message contains {what} at position {forbidden.start()}"
    return None


def id_problem(value: object) -> str | None:
    """What is wrong with ``value`` as a message or lease id, if anything."""
    if type(value) is not str or not 0 < len(value) <= MAX_ID or not _ID.match(value):
        return f"id {_show(value)} is not 1-{MAX_ID} characters of [A-Za-z0-9._-]"
    return None


def key_problem(key: object) -> str | None:
    """What is wrong with ``key`` as a message key, if anything."""
    if type(key) is not int:
        return f"key {_show(key)} is a {type(key).__name__}, not an int"
    if not 0 < key <= MAX_KEY:
        return f"key {key} is outside 1..{MAX_KEY}"
    return None


def message_problem(record: object) -> str | None:
    """What is wrong with ``record`` as a stored ``(id, author, text, kind)``, if anything."""
    if type(record) is not tuple or len(record) != 4:
        return f"record {_show(record)} is not an (id, author, text, kind) tuple"
    message_id, author, text, kind = record
    if type(kind) is not int or not 0 <= kind < len(KINDS):
        return f"kind {_show(kind)} is not an int from 0 to {len(KINDS) - 1}"
    if author is not None:
        problem = _user_name_problem(author)
        if problem is not None:
            return f"author: {problem}"
    return id_problem(message_id) or text_problem(text)


def number_problem(what: str, value: object) -> str | None:
    """What is wrong with ``value`` as a finite int or float (not a bool), if anything."""
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        return f"{what} {_show(value)} is not a finite number"
    return None


def _fields_problem(
    what: str, state: object, fields: frozenset[str], optional: frozenset[str] = frozenset()
) -> str | None:
    if not isinstance(state, Mapping):
        return f"{what} state is not a mapping"
    keys = set(state.keys()) - (optional & set(state.keys()))
    if keys != fields:
        extra, missing = sorted(map(str, keys - fields)), sorted(fields - keys)
        parts = [f"has no {', '.join(missing)}"] if missing else []
        parts += [f"has extra {', '.join(_show(k) for k in extra)}"] if extra else []
        return f"{what} {' and '.join(parts)}"
    return None


def clock_problem(state: object, *, messages: bool = True) -> str | None:
    """What is wrong with a `RoomClock` state (a mapping of its attributes), if anything.

    Older rooms stored no ``pending`` or ``flushed``; those load with the class
    defaults and are accepted here. With ``messages=False`` the records in
    ``pending`` are not checked (the caller checks the new ones itself).
    """
    if not isinstance(state, Mapping):
        return "clock state is not a mapping"
    if not set(state.keys()) <= CLOCK_FIELDS:
        extra = sorted(map(_show, set(state.keys()) - CLOCK_FIELDS))
        return f"clock has extra {', '.join(extra)}"
    head, count = state.get("head"), state.get("count")
    flushed, pending = state.get("flushed"), state.get("pending", ())
    for what, value in (("head", head), ("count", count), ("flushed", flushed)):
        if what == "flushed" and value is None:
            continue
        if type(value) is not int or not 0 <= value <= MAX_KEY:
            return f"clock {what} {_show(value)} is not an int from 0 to {MAX_KEY}"
    if type(pending) is not tuple:
        return f"clock pending {_show(pending)} is not a tuple"
    if len(pending) > MAX_PENDING:
        return f"clock holds {len(pending)} pending messages; the limit is {MAX_PENDING}"
    previous = 0
    for entry in pending:
        if type(entry) is not tuple or len(entry) != 2:
            return f"pending entry {_show(entry)} is not a (key, record) pair"
        key, record = entry
        # key_problem inlined: this loop runs on every post, in the server.
        if type(key) is not int or not previous < key <= MAX_KEY:
            problem = key_problem(key)
            if problem is not None:
                return f"pending {problem}"
            return f"pending key {key} is not above the one before it ({previous})"
        previous = key
        if messages:
            problem = message_problem(record)
            if problem is not None:
                return f"pending message at key {key}: {problem}"
    if previous > head:  # type: ignore[operator]
        return f"clock head {head} is below its pending key {previous}"
    if count < len(pending):  # type: ignore[operator]
        return f"clock count {count} is below its {len(pending)} pending messages"
    # Not bound below by ``count``: a writer of older code (or one bypassing
    # chatzeo) moves ``count`` and leaves ``total`` as it was; readers then take
    # ``count`` (`RoomClock.posted`).
    total = state.get("total")
    if total is not None and (type(total) is not int or not 0 <= total <= MAX_KEY):
        return f"clock total {_show(total)} is not None or an int from 0 to {MAX_KEY}"
    return None


def room_problem(state: object) -> str | None:
    """What is wrong with a `ChatSession` state's fields, if anything. References
    (``_messages``, ``_clock``, ``presence``) are the caller's to check."""
    problem = _fields_problem("room", state, ROOM_FIELDS, ROOM_OPTIONAL)
    if problem is not None:
        return problem
    assert isinstance(state, Mapping)
    problem = _room_name_problem(state["name"]) or topic_problem(state.get("topic"))
    if problem is not None:
        return problem
    cap = state["max_messages"]
    if cap is not None and (type(cap) is not int or not 0 < cap <= MAX_KEY):
        return f"room max_messages {_show(cap)} is not None or an int from 1 to {MAX_KEY}"
    age = state["max_age"]
    if age is not None and (number_problem("", age) is not None or age <= 0):
        return f"room max_age {_show(age)} is not None or a finite number > 0"
    return None


def user_problem(state: object) -> str | None:
    """What is wrong with a `User` state's fields, if anything (``leases`` is a
    reference, the caller's to check)."""
    problem = _fields_problem("user", state, USER_FIELDS, USER_OPTIONAL)
    if problem is not None:
        return problem
    assert isinstance(state, Mapping)
    return (
        _user_name_problem(state["name"])
        or number_problem("user last_connected", state["last_connected"])
        or joined_problem(state.get("joined", ()))
    )


def topic_problem(topic: object) -> str | None:
    """What is wrong with a room's ``topic``: None or ``(text, setter, time)``."""
    if topic is None:
        return None
    if type(topic) is not tuple or len(topic) != 3:
        return f"room topic {_show(topic)} is not None or a (text, setter, time) triple"
    text, by, when = topic
    if text != "":
        problem = text_problem(text)
        if problem is not None:
            return f"room topic: {problem}"
        if "\n" in text:
            return "room topic is more than one line"
        if len(text.encode("utf-8")) > MAX_TOPIC_BYTES:
            return f"room topic is longer than {MAX_TOPIC_BYTES} bytes"
    problem = _user_name_problem(by)
    if problem is not None:
        return f"room topic setter: {problem}"
    return number_problem("room topic time", when)


def joined_problem(joined: object) -> str | None:
    """What is wrong with a user's ``joined`` rooms: a tuple of distinct room names."""
    if type(joined) is not tuple:
        return f"user joined {_show(joined)} is not a tuple"
    if len(joined) > MAX_JOINED:
        return f"user joined {len(joined)} rooms; the limit is {MAX_JOINED}"
    if len(set(joined)) != len(joined):
        return "user joined a room twice"
    for name in joined:
        problem = _room_name_problem(name)
        if problem is not None:
            return f"user joined: {problem}"
    return None


def markers_problem(state: object) -> str | None:
    """What is wrong with a `ReadMarkers` state, if anything."""
    if not isinstance(state, Mapping):
        return "markers state is not a mapping"
    if not set(state.keys()) <= MARKERS_FIELDS or "_keys" not in state:
        return f"markers hold {', '.join(sorted(map(_show, state.keys())))}, not _keys"
    for attribute in ("_keys", "_positions"):
        values = state.get(attribute, {})
        if type(values) is not dict or len(values) > MAX_JOINED:
            return f"markers {attribute} is not a dict of at most {MAX_JOINED} rooms"
        for name, key in values.items():
            problem = _room_name_problem(name)
            if problem is not None:
                return f"markers {attribute}: {problem}"
            if type(key) is not int or not 0 <= key <= MAX_KEY:
                return f"markers {attribute} {_show(key)} is not an int from 0 to {MAX_KEY}"
    return None


def root_problem(state: object) -> str | None:
    """What is wrong with a `ChatRoot` state's fields, if anything."""
    # ``private`` (chatzeo.privacy) exists only where the server made it (TLS).
    optional = ROOT_FIELDS | {"private"}
    fields = optional if isinstance(state, Mapping) and "private" in state else ROOT_FIELDS
    problem = _fields_problem("chatzeo root", state, fields)
    if problem is not None:
        return problem
    assert isinstance(state, Mapping)
    limit = state["max_connections"]
    if type(limit) is not int or not 0 < limit <= 1_000_000:
        return f"root max_connections {_show(limit)} is not an int from 1 to 1000000"
    lease = state["lease_seconds"]
    if number_problem("", lease) is not None or not 0 < lease <= 86_400:
        return f"root lease_seconds {_show(lease)} is not a number of seconds up to a day"
    return None


def _entry_problem(what: str, lease_id: object, entry: object, name_rule: Any) -> str | None:
    problem = id_problem(lease_id)
    if problem is not None:
        return f"{what} {problem}"
    if type(entry) is not tuple or len(entry) != 2:
        return f"{what} {_show(entry)} is not a (name, expiry) pair"
    name, expiry = entry
    return name_rule(name) or number_problem(f"{what} expiry", expiry)


def presence_problem(lease_id: object, entry: object) -> str | None:
    """What is wrong with a presence item ``lease_id -> (user name, expiry)``, if anything."""
    return _entry_problem("presence", lease_id, entry, _user_name_problem)


def lease_problem(lease_id: object, entry: object) -> str | None:
    """What is wrong with a lease item ``lease_id -> (room name or None, expiry)``, if anything."""

    def room_or_none(name: object) -> str | None:
        return None if name is None else _room_name_problem(name)

    return _entry_problem("lease", lease_id, entry, room_or_none)


def expiry_problem(expiry: float, now: float, lease_seconds: float) -> str | None:
    """What is wrong with a lease or presence expiry written at ``now``, if anything:
    it may lie at most ``lease_seconds`` + `FUTURE_SKEW` ahead."""
    if expiry > now + lease_seconds + FUTURE_SKEW:
        return (
            f"expiry {expiry:.0f} lies more than the lease time ({lease_seconds:g} s) "
            "ahead of the server's clock"
        )
    return None


def plain_extension(
    value: object,
    *,
    max_items: int = MAX_EXTENSION_ITEMS,
    max_key: int = MAX_EXTENSION_KEY,
    max_text: int = MAX_EXTENSION_TEXT,
) -> dict[str, Any] | str:
    """A transaction extension ``value`` as a fresh dict of plain values, or the
    reason it is not one (raw bytes, not a mapping, too many items, a long key, a
    value other than a bounded str, int, float, bool or None)."""
    if isinstance(value, bytes | bytearray):
        return "the extension must be a mapping, not raw bytes"
    if not isinstance(value, dict):
        return f"the extension must be a mapping, not {type(value).__name__}"
    if len(value) > max_items:
        return f"the extension has {len(value)} items (limit {max_items})"
    plain: dict[str, Any] = {}
    for key, item in value.items():
        if type(key) is not str or len(key) > max_key:
            return f"extension keys must be str of at most {max_key} characters"
        if (
            item is None
            or type(item) in (bool, float)
            or (type(item) is int and -(2**63) <= item < 2**63)
            or (type(item) is str and len(item) <= max_text)
        ):
            plain[key] = item
        else:
            return (
                f"extension value of {key!r} is not a plain value (str, int, float, "
                "bool or None, bounded)"
            )
    return plain


def stored_extension(data: bytes) -> dict[str, Any] | None:
    """A stored transaction extension (FileStorage keeps its pickle) as a dict, or
    None if it is not a pickled mapping of plain values. Never runs code: for old
    files, where a client could have stored any pickle as its extension."""
    if not data:
        return {}
    try:
        value = safe_loads(data)
    except Exception:
        return None
    plain = plain_extension(value)
    return plain if isinstance(plain, dict) else None
