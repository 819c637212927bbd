"""The ZEO protocol boundary of every `chatzeo serve`: which calls a client may make.

Every chat user is a full ZEO client, so everything ZEO's `ZEOStorage` exposes is
attack surface, not only the records a commit stores. `create_server` builds ZEO's
`StorageServer` with three chatzeo parts:

`ChatAcceptor` / `ChatServerProtocol` (one per TCP or unix-socket connection)
    * Frames: a message whose 4-byte length header is above
      `ProtocolLimits.max_frame_bytes` is never buffered: its bytes are skipped as
      they arrive, the open transaction is refused (the writer's vote gets the
      error), and outside a transaction the connection is closed.
    * Decoding: ZEO's own server decoder lets a message's pickle call any global of
      ``builtins`` (``exec``, ``eval``, ``getattr``...), i.e. run code in the server
      before any method is even looked up. Messages here are decoded by
      `safe_loads`, which names no global at all.
    * Dispatch: a call ZEO does not register, or `ChatZEOStorage.check_call` refuses,
      gets one `ProtocolViolation` reply and one log line; an asynchronous call
      refused inside a transaction refuses that transaction instead (ZEO cannot
      answer an asynchronous call; the vote that follows can).
    * The hung-writer fix (docs/operations.md): ZEO marks a connection closed before
      its transport reports the loss, so ``connection_lost`` never calls
      ``notify_disconnected`` when the *server* closes it (``transaction-timeout``,
      shutdown, cache invalidation) and a voted transaction keeps the commit lock
      for good. `ChatServerProtocol.close` tells the handler first, which aborts
      the transaction and releases the lock.

`ChatZEOStorage` (the handler behind each connection; `chatzeo.server.guard` subclasses it)
    decides every call by the table below and checks its arguments. Limits are in
    `ProtocolLimits`; docs/operations.md lists them.

=============================  ==========  ==================================================
call                           who         rule
=============================  ==========  ==================================================
register                       anyone      storage name a short str, read_only a bool
get_info, lastTransaction,     anyone      no arguments
ping
getInvalidations               anyone      a tid (8 bytes)
new_oids                       anyone      a count (ZEO hands out at most 100)
loadBefore                     anyone      an oid and a tid (8 bytes each)
tpc_begin                      anyone      no tid (the server chooses it), status ' ' only,
                                           user and description short, the extension a
                                           plain mapping of plain values which the server
                                           re-encodes itself (never the given bytes)
storea                         anyone      oid and serial 8 bytes; the record at most
                                           ``max_record_bytes``; a transaction at most
                                           ``max_transaction_records`` records and
                                           ``max_transaction_bytes`` bytes
checkCurrentSerialInTransaction  anyone    oid and serial; counts as a record
vote, tpc_finish, tpc_abort    anyone      a transaction id (ZEO matches it)
set_client_label               anyone      a short label of ``[A-Za-z0-9 ._:/@-]`` (it goes
                                           into every log line of the connection)
iterator_gc                    anyone      a list of ints; a no-op, as no iterator starts
chatzeo_filter, chatzeo_sync   anyone      no arguments; `chatzeo.server.fanout`'s calls (it checks
                                           them in ``FanoutMixin.check_call``)
chatzeo_want                   anyone      one bounded list of oids (fan-out push requests)
pack                           operator    a time; under TLS a certificate name given to
                                           ``chatzeo serve --operator``, else a loopback or
                                           unix-socket peer
server_status                  operator    no arguments
deleteObject                   nobody      chatzeo never deletes; pack collects garbage
restorea                       nobody      writes records with tids of its choosing
undoa                          nobody      undo rewrites history
undoLog, undoInfo, history     nobody      the storage unpickles each transaction's stored
                                           extension with ZODB's unrestricted loader
loadSerial, getTid,            nobody      chatzeo's clients never call them; loadSerial walks
record_iternext                            an object's revisions in the server's one thread
iterator_start, iterator_next  nobody      walk the whole storage in the server's one thread
iterator_record_start/_next
storeBlobStart/Chunk/End/      nobody      chatzeo stores no blobs; chunks are unbounded temp
Shared, sendBlob                           files, storeBlobShared names server paths
new_oid                        nobody      ZEO registers it but has no such method
=============================  ==========  ==================================================

The ``ruok`` handshake (ZEO's status probe) is left as ZEO answers it: counts only.

Connections: under TLS the server counts live connections per certificate name and
refuses every data call of one past ``--max-connections`` with `TooManyConnections`
(then closes it). Without TLS there is no identity to count by; see docs/security.md.

Threads: everything here runs in ZEO's asyncio loop thread, which `chatzeo serve`
runs in its main thread; ZEO's transaction-timeout thread only schedules `close`
into that loop.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ZEO.asyncio.server import Acceptor, Delay, ServerProtocol
from ZEO.StorageServer import StorageServer, ZEOStorage

from ..allowlist import safe_loads
from ..errors import ProtocolViolation, TooManyConnections
from ..records import (
    MAX_EXTENSION_ITEMS,
    MAX_EXTENSION_KEY,
    MAX_EXTENSION_TEXT,
    MAX_RECORD_BYTES,
    plain_extension,
)

__all__ = [
    "ProtocolLimits",
    "ServerPolicy",
    "ChatZEOStorage",
    "ChatServerProtocol",
    "ChatAcceptor",
    "ChatStorageServer",
    "create_server",
    "certificate_identity",
    "CALLS",
]

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class ProtocolLimits:
    """Byte and count limits of the protocol (docs/operations.md).

    A record may be as large as the record schema allows (`MAX_RECORD_BYTES`, 1 MiB:
    a room clock full of `MAX_PENDING` messages of the largest text fits); honest
    records stay far below it.
    """

    max_record_bytes: int = MAX_RECORD_BYTES
    max_transaction_records: int = 10_000
    max_transaction_bytes: int = 16 * MiB
    # A storea message is its record plus a few dozen bytes of framing.
    max_frame_bytes: int = MAX_RECORD_BYTES + 64 * 1024
    max_user_bytes: int = 1024
    max_description_bytes: int = 4096
    max_extension_items: int = MAX_EXTENSION_ITEMS
    max_extension_key: int = MAX_EXTENSION_KEY
    max_extension_text: int = MAX_EXTENSION_TEXT


@dataclass(frozen=True)
class ServerPolicy:
    """What one `chatzeo serve` enforces at the protocol boundary.

    ``checks=False`` serves ZEO's stock handler (only to measure what the checks
    cost: `bench.trust`). ``operators`` are certificate names allowed to pack under
    TLS; ``max_connections`` is the per-certificate connection limit (TLS only).
    """

    limits: ProtocolLimits = field(default_factory=ProtocolLimits)
    operators: frozenset[str] = frozenset()
    max_connections: int = 8
    checks: bool = True
    # How long a connection past the limit may stay before it is closed, so that
    # its client can read the refusal; it is never counted meanwhile.
    refused_grace_seconds: float = 5.0


# -- decoding ----------------------------------------------------------------------


def _safe_decode(message: bytes) -> Any:
    return safe_loads(message)


# -- argument rules ------------------------------------------------------------------


@dataclass(frozen=True)
class _Arg:
    what: str
    test: Callable[[Any], bool]


_TID = _Arg("8 bytes", lambda v: type(v) is bytes and len(v) == 8)
_TXN = _Arg("a transaction id (int)", lambda v: type(v) is int)
_DATA = _Arg("bytes", lambda v: type(v) is bytes)
_ANY = _Arg("anything", lambda v: True)
_FLAG = _Arg("a bool", lambda v: type(v) in (bool, int))
_NAME = _Arg("a short str", lambda v: type(v) is str and len(v) <= 64)
_COUNT = _Arg("a count", lambda v: type(v) is int and 0 <= v <= 1000)
_TIME = _Arg("a time", lambda v: type(v) in (int, float))
_LABEL = _Arg(
    "a short label",
    lambda v: type(v) is str and re.fullmatch(r"[A-Za-z0-9 ._:/@-]{0,64}", v) is not None,
)
_IDS = _Arg(
    "a list of ints", lambda v: type(v) in (list, tuple) and all(type(i) is int for i in v)
)


@dataclass(frozen=True)
class Call:
    """How `ChatZEOStorage` treats one ZEO call: ``who`` is ``"anyone"``,
    ``"operator"`` or ``"nobody"``; ``args`` the positional arguments, of which
    the first ``required`` must be given; ``reason`` says why nobody may."""

    who: str
    args: tuple[_Arg, ...] = ()
    required: int | None = None
    reason: str = ""


def _nobody(reason: str) -> Call:
    return Call("nobody", reason=reason)


_HISTORY = "it unpickles stored transaction extensions with ZODB's unrestricted loader"
_ITERATOR = "chatzeo's clients never iterate the storage"
_BLOB = "chatzeo stores no blobs"

CALLS: dict[str, Call] = {
    "register": Call("anyone", (_NAME, _FLAG), 1),
    "get_info": Call("anyone"),
    "lastTransaction": Call("anyone"),
    "ping": Call("anyone"),
    "getInvalidations": Call("anyone", (_TID,)),
    "new_oids": Call("anyone", (_COUNT,), 0),
    "loadBefore": Call("anyone", (_TID, _TID)),
    # Checked in ChatZEOStorage.tpc_begin, where a refusal can wait for the vote.
    "tpc_begin": Call("anyone", (_TXN, _ANY, _ANY, _ANY, _ANY, _ANY), 4),
    "storea": Call("anyone", (_TID, _TID, _DATA, _TXN)),
    "checkCurrentSerialInTransaction": Call("anyone", (_TID, _TID, _TXN)),
    "vote": Call("anyone", (_TXN,)),
    "tpc_finish": Call("anyone", (_TXN,)),
    "tpc_abort": Call("anyone", (_TXN,)),
    "set_client_label": Call("anyone", (_LABEL,)),
    "iterator_gc": Call("anyone", (_IDS,)),
    "pack": Call("operator", (_TIME, _FLAG), 1),
    "server_status": Call("operator"),
    "deleteObject": _nobody("chatzeo never deletes objects; pack collects garbage"),
    "restorea": _nobody("restore writes records with tids of the client's choosing"),
    "undoa": _nobody("undo rewrites history"),
    "undoLog": _nobody(_HISTORY),
    "undoInfo": _nobody(_HISTORY),
    "history": _nobody(_HISTORY),
    "loadSerial": _nobody("chatzeo's clients load current revisions only (loadBefore)"),
    "getTid": _nobody("chatzeo's clients never ask for it"),
    "record_iternext": _nobody(_ITERATOR),
    "iterator_start": _nobody(_ITERATOR),
    "iterator_next": _nobody(_ITERATOR),
    "iterator_record_start": _nobody(_ITERATOR),
    "iterator_record_next": _nobody(_ITERATOR),
    "storeBlobStart": _nobody(_BLOB),
    "storeBlobChunk": _nobody(_BLOB),
    "storeBlobEnd": _nobody(_BLOB),
    "storeBlobShared": _nobody(_BLOB),
    "sendBlob": _nobody(_BLOB),
    "new_oid": _nobody("ZEO has no such call"),
}
# Calls that add a record to the open transaction, counted against its limits.
_STORES = frozenset({"storea", "checkCurrentSerialInTransaction"})
# Calls a connection past its certificate's connection limit may still make: ZEO's
# client makes them while connecting, and failing one there makes it retry silently
# instead of reporting the refusal of its first real call.
_CONNECTING = frozenset({"register", "get_info", "lastTransaction", "getInvalidations", "ping"})


def certificate_identity(peercert: dict[str, Any] | None) -> str | None:
    """The commonName of a certificate as `ssl.SSLSocket.getpeercert` returns it;
    None without a certificate, or with no or several commonNames."""
    if not peercert:
        return None
    names = [
        value
        for rdn in peercert.get("subject", ())
        for key, value in rdn
        if key == "commonName"
    ]
    return names[0] if len(names) == 1 else None


def _is_local(peer: Any) -> bool:
    """A unix-socket peer (no address, or a path) or a loopback IP address."""
    if not isinstance(peer, tuple):
        return True
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the per-connection handler ----------------------------------------------------


class ChatZEOStorage(ZEOStorage):
    """ZEO's per-connection handler, accepting only the calls in `CALLS`.

    Refusals inside a transaction are remembered (`refuse_transaction`) and raised
    as `ProtocolViolation` by its vote, after the transaction is aborted; nothing
    of a refused transaction is buffered after the refusal.
    """

    log_label: str
    # The connection's verified client certificate (`ssl.SSLSocket.getpeercert`'s
    # form) and its name (`certificate_identity`), read once when it connects; the
    # commit guard, the read guard and fan-out use these, and read neither again.
    peercert: dict[str, Any] | None = None
    identity: str | None = None
    operator = False
    # The first refusal of the current transaction, and what it has buffered.
    _refusal: str | None = None
    _records = 0
    _bytes = 0
    _counted = False
    _gone = False
    _over_limit: TooManyConnections | None = None

    def __init__(self, server: Any, read_only: Any = 0) -> None:
        super().__init__(server, read_only)
        self.policy: ServerPolicy = server.policy
        self.limits = self.policy.limits

    # -- connecting ------------------------------------------------------------

    def notify_connected(self, conn: Any) -> None:
        super().notify_connected(conn)
        transport = conn.sm_protocol.transport if conn.sm_protocol is not None else None
        extra = transport.get_extra_info if transport is not None else (lambda name: None)
        peer = extra("peername")
        self.peercert = extra("peercert")
        self.identity = certificate_identity(self.peercert)
        tls = self.server.ssl is not None
        self.operator = (self.identity in self.policy.operators) if tls else _is_local(peer)
        # ZEO labels a connection by the server's own address; add the peer's.
        shown = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix socket"
        self.log_label += f" peer {shown}" + (f" {self.identity!r}" if tls else "")
        if tls:
            self._count_in(conn)

    def _count_in(self, conn: Any) -> None:
        live: Counter[str | None] = self.server.live_connections
        limit = self.policy.max_connections
        if live[self.identity] >= limit:
            self._over_limit = TooManyConnections(self.identity or "(no name)", limit)
            self.log(
                f"refused a connection: certificate {self.identity!r} already has "
                f"{limit} live connections (the limit)", logging.WARNING,
            )
            conn.loop.call_later(self.policy.refused_grace_seconds, conn.close)
            return
        live[self.identity] += 1
        self._counted = True

    def notify_disconnected(self) -> None:
        # Called by the transport's connection_lost, or by ChatServerProtocol.close
        # when the server closes the connection; only the first counts.
        if self._gone:
            return
        self._gone = True
        if self._counted:
            live: Counter[str | None] = self.server.live_connections
            live[self.identity] -= 1
            if live[self.identity] <= 0:
                del live[self.identity]
        super().notify_disconnected()

    # -- the gate ----------------------------------------------------------------

    def check_call(self, name: str, args: tuple[Any, ...]) -> None:
        """Raise `ProtocolViolation` unless ``name(*args)`` is a call this
        connection may make (see `CALLS`)."""
        rule = CALLS.get(name)
        if rule is None or rule.who == "nobody":
            reason = rule.reason if rule is not None else "ZEO has no such call"
            raise ProtocolViolation(f"{name} is not accepted: {reason}")
        if rule.who == "operator" and not self.operator:
            raise ProtocolViolation(
                f"{name} is for operators only ("
                + ("chatzeo serve --operator NAME" if self.server.ssl is not None
                   else "a loopback or unix-socket peer") + ")"
            )
        if self._over_limit is not None and name not in _CONNECTING:
            raise self._over_limit
        required = len(rule.args) if rule.required is None else rule.required
        if not required <= len(args) <= len(rule.args):
            raise ProtocolViolation(
                f"{name} takes {required}-{len(rule.args)} arguments, not {len(args)}"
                if required != len(rule.args)
                else f"{name} takes {required} arguments, not {len(args)}"
            )
        for index, (arg, value) in enumerate(zip(rule.args, args, strict=False)):
            if not arg.test(value):
                raise ProtocolViolation(f"{name}: argument {index + 1} must be {arg.what}")
        if name in _STORES and self._in_transaction(args[-1]):
            # Nothing of a refused transaction reaches the handler: not buffered.
            self._count(len(args[2]) if name == "storea" else 0)

    def refuse_transaction(self, reason: str) -> None:
        """Refuse the current transaction: its vote raises `ProtocolViolation`
        (``reason``). Logged once per transaction."""
        if self._refusal is None:
            self._refusal = reason
            self.log(f"refused a transaction: {reason}", logging.WARNING)

    # -- transactions ------------------------------------------------------------

    def tpc_begin(
        self, id: Any, user: Any, description: Any, ext: Any, tid: Any = None, status: Any = " "
    ) -> None:
        fresh = self.transaction is None
        limits = self.limits
        problems = []
        if tid is not None:
            problems.append("a client may not choose the transaction's tid")
        if status != " ":
            problems.append(f"a client may not set the transaction status {status!r}"[:120])
        user = self._text(user, "user", limits.max_user_bytes, problems)
        description = self._text(description, "description", limits.max_description_bytes,
                                 problems)
        plain = plain_extension(
            {} if ext == b"" else ext,
            max_items=limits.max_extension_items,
            max_key=limits.max_extension_key,
            max_text=limits.max_extension_text,
        )
        if isinstance(plain, str):
            problems.append(plain)
            plain = {}
        # The server's own metadata: the dict is pickled by ZODB, never the given bytes.
        super().tpc_begin(id, user, description, plain)
        if fresh and self.transaction is not None:
            self._refusal, self._records, self._bytes = None, 0, 0
            if problems:
                self.refuse_transaction("; ".join(problems))

    @staticmethod
    def _text(value: Any, what: str, limit: int, problems: list[str]) -> bytes:
        if isinstance(value, str):
            value = value.encode("utf-8", "replace")
        if not isinstance(value, bytes):
            problems.append(f"the transaction's {what} must be str or bytes")
            return b""
        if len(value) > limit:
            problems.append(f"the transaction's {what} is {len(value)} bytes (limit {limit})")
            return b""
        return value

    def _in_transaction(self, id: Any) -> bool:
        return self.transaction is not None and self.transaction.id == id

    def _count(self, size: int) -> None:
        """Count one more record of ``size`` bytes in the open transaction; raise
        `ProtocolViolation` if the transaction is refused already or this breaks a
        limit. Runs in the gate, before any handler (the guard's too) sees the call."""
        limits = self.limits
        if self._refusal is not None:
            raise ProtocolViolation(self._refusal)
        if size > limits.max_record_bytes:
            raise ProtocolViolation(
                f"a record of {size} bytes is above the limit of {limits.max_record_bytes}"
            )
        self._records += 1
        self._bytes += size
        if self._records > limits.max_transaction_records:
            raise ProtocolViolation(
                f"a transaction may store at most {limits.max_transaction_records} records"
            )
        if self._bytes > limits.max_transaction_bytes:
            raise ProtocolViolation(
                f"a transaction may store at most {limits.max_transaction_bytes} bytes"
            )

    def frame_too_large(self, size: int) -> bool:
        """A message of ``size`` bytes was skipped unread: refuse the open transaction
        and return True, or return False when none is open (the caller closes)."""
        if self.transaction is None:
            return False
        self.refuse_transaction(
            f"a message of {size} bytes is above the limit of {self.limits.max_frame_bytes}"
        )
        return True

    def vote(self, tid: Any) -> Any:
        if self._refusal is not None and self._in_transaction(tid):
            reason = self._refusal
            self.tpc_abort(tid)
            raise ProtocolViolation(reason)
        return super().vote(tid)

    def _clear_transaction(self) -> None:
        self._refusal, self._records, self._bytes = None, 0, 0
        super()._clear_transaction()

    def set_client_label(self, label: str) -> None:
        # ZEO appends the listening address; the peer's says more.
        self.log_label = f"{label} {self.log_label}"

    def iterator_gc(self, iids: Any) -> None:
        # No iterator is ever started here (see CALLS); ZEO's client still sends this.
        return None


# -- the connection ----------------------------------------------------------------


class _FrameLimit:
    """Sits between the transport and ZEO's sized-message reader: follows the same
    framing (4-byte big-endian length, then the message) and skips, unbuffered,
    every message longer than ``limit``, calling ``too_large(size)``; when that
    returns False the connection is closed and nothing more is read."""

    def __init__(
        self, forward: Callable[[bytes], None], limit: int,
        too_large: Callable[[int], bool], close: Callable[[], Any],
    ) -> None:
        self.forward = forward
        self.limit = limit
        self.too_large = too_large
        self.close = close
        self.header = b""
        self.remaining = 0  # bytes left of the current message
        self.skipping = False
        self.closed = False

    def __call__(self, data: bytes) -> None:
        if self.closed:
            return
        position, size = 0, len(data)
        kept: list[bytes] = []
        whole = True  # nothing skipped in this chunk: forward it as it came
        while position < size:
            if self.remaining:
                take = min(self.remaining, size - position)
                if self.skipping:
                    whole = False
                else:
                    kept.append(data[position:position + take])
                position += take
                self.remaining -= take
                continue
            piece = data[position:position + 4 - len(self.header)]
            position += len(piece)
            self.header += piece
            if len(self.header) < 4:
                break
            header, self.header = self.header, b""
            (length,) = struct.unpack(">I", header)
            self.remaining = length
            self.skipping = length > self.limit
            if self.skipping:
                whole = False
                if not self.too_large(length):
                    self.closed = True
                    self.close()
                    return
            else:
                kept.append(header)
        if whole:
            self.forward(data)
        elif kept:
            self.forward(b"".join(kept))


class ChatServerProtocol(ServerProtocol):
    """ZEO's server protocol with chatzeo's frame limit, decoder, gate and close."""

    zeo_storage: ChatZEOStorage | None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        storage = self.zeo_storage
        assert storage is not None
        self.data_received = _FrameLimit(
            self.sm_protocol.data_received,
            storage.limits.max_frame_bytes,
            storage.frame_too_large,
            self._close_oversized,
        )

    def _close_oversized(self) -> None:
        log.warning("closed %s: a message above the size limit outside a transaction",
                    self._label())
        self.close()

    def _label(self) -> str:
        storage = self.zeo_storage
        return storage.log_label if storage is not None else "a connection"

    def finish_connection(self, protocol_version: bytes) -> None:
        encoding = self.announce_protocol[:1]
        if protocol_version != b"ruok" and protocol_version[:1] != encoding:
            # ZEO would decode with whichever encoding the client names.
            log.warning("closed %s: handshake %r does not use the server's encoding %r",
                        self._label(), protocol_version[:8], encoding)
            self.close()
            return
        super().finish_connection(protocol_version)
        if protocol_version[:1] == b"Z":
            # ZEO's own server decoder lets a message call any global of builtins;
            # msgpack (the other encoding) carries plain data only.
            self.decode = _safe_decode

    def message_received(self, message: bytes) -> None:
        storage = self.zeo_storage
        if storage is None:
            return  # closed
        try:
            message_id, async_, name, args = self.decode(message)
        except Exception as error:
            log.warning("closed %s: undecodable message: %s", self._label(),
                        _shown(str(error)))
            self.close()
            return
        if message_id == -1:
            return  # keep-alive
        try:
            if not isinstance(name, str) or name not in self.methods:
                raise ProtocolViolation(f"{_shown(name)} is not a call accepted now")
            if not isinstance(args, tuple):
                raise ProtocolViolation(f"{name}: arguments must be a tuple")
            storage.check_call(name, args)
        except (ProtocolViolation, TooManyConnections) as refusal:
            self._refuse(storage, message_id, async_, str(name), refusal)
            return
        # From here on, as ZEO's ServerProtocol.message_received.
        try:
            result = getattr(storage, name)(*args)
        except Exception as exc:
            if not isinstance(exc, self.unlogged_exception_types):
                log.exception("%s`%r` raised exception:", "async " if async_ else "", name)
            if async_:
                self.close()  # no way to answer
                return
            self.send_error(message_id, exc)
            return
        if not async_:
            self.send_reply(message_id, result)

    def _refuse(
        self, storage: ChatZEOStorage, message_id: Any, async_: Any, name: str,
        refusal: Exception,
    ) -> None:
        if async_ and storage.transaction is not None:
            storage.refuse_transaction(str(refusal))
            return
        if isinstance(refusal, ProtocolViolation):
            storage.log(f"refused {name}: {refusal}", logging.WARNING)
        if async_:
            self.close()  # nothing to answer an asynchronous call with
        else:
            self.send_error(message_id, refusal)
        if isinstance(refusal, TooManyConnections):
            self.close()  # after the reply: the transport sends what it holds first

    def close(self) -> Any:
        storage = self.zeo_storage
        closing = super().close()
        # ZEO's close forgets the handler, so connection_lost cannot tell it: a voted
        # transaction would keep the commit lock for good. Tell it now.
        if storage is not None and storage.connected:
            try:
                storage.notify_disconnected()
            except Exception:
                log.exception("releasing %s after closing it", storage.log_label)
        return closing


class ChatAcceptor(Acceptor):
    """ZEO's acceptor, making a `ChatServerProtocol` for each connection."""

    def factory(self) -> ChatServerProtocol:
        storage = self.storage_server.create_client_handler()
        return ChatServerProtocol(self.event_loop, self.addr, storage, self.msgpack)


class ChatStorageServer(StorageServer):
    """ZEO's `StorageServer` serving `ChatZEOStorage` handlers under ``policy``."""

    def __init__(self, address: Any, storages: dict[str, Any], *, policy: ServerPolicy,
                 **options: Any) -> None:
        self.policy = policy
        # Live connections per certificate name (TLS only); loop thread only.
        self.live_connections: Counter[str | None] = Counter()
        if policy.checks:
            options["Acceptor"] = ChatAcceptor
            # Refusals are logged in one line here; ZEO would add a traceback.
            for quiet in (ServerProtocol, Delay):
                for kind in (ProtocolViolation, TooManyConnections):
                    if kind not in quiet.unlogged_exception_types:
                        quiet.unlogged_exception_types += (kind,)
        super().__init__(address, storages, **options)

    def create_client_handler(self) -> ZEOStorage:
        if self.policy.checks:
            return ChatZEOStorage(self, self.read_only)
        return ZEOStorage(self, self.read_only)


def create_server(storages: dict[str, Any], options: Any, policy: ServerPolicy) -> Any:
    """ZEO's ``runzeo.create_server``, but a `ChatStorageServer` under ``policy``."""
    return ChatStorageServer(
        options.address,
        storages,
        policy=policy,
        read_only=options.read_only,
        client_conflict_resolution=options.client_conflict_resolution,
        msgpack=bool(options.msgpack),
        invalidation_queue_size=options.invalidation_queue_size,
        invalidation_age=options.invalidation_age,
        transaction_timeout=options.transaction_timeout,
        ssl=options.ssl,
    )

