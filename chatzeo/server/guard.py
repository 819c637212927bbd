"""The guard of every `chatzeo serve`: what each commit stores, and (with TLS) who commits.

Every server
    ZEO's `StorageServer` makes one `ZEOStorage` per client connection through
    ``create_client_handler``; `install_guard` makes it a `GuardedZEOStorage`, which
    checks each commit against `chatzeo.server.rules`' record, history and structure
    rules (the shapes of `chatzeo.records`), TLS or not.

Identity (``install_guard(..., identities=True)``: a server with client certificates)
    The identity is the one `chatzeo.server.protocol.ChatZEOStorage` read from the
    connection's verified peer certificate when the ZEO handshake was done
    (``notify_connected``): the subject's commonName, verbatim. A certificate with
    no commonName, or more than one, has no identity, and every commit touching
    chatzeo's graph is refused for it. The identity rules (authors, users' own
    objects) then apply as well.

Checking
    ZEO logs each store of a transaction and replays them in ``_vote`` once it holds
    the commit lock. `GuardedZEOStorage` keeps the same records as they arrive, and
    its ``_vote`` first hands them to `chatzeo.server.rules.check_commit`; a refusal ends
    the transaction before the storage sees any of it, is logged here, and reaches
    the writer's ``commit()`` as `TrustViolation`. Deleting a checked object, undo,
    restore and blobs are refused outright: chatzeo writes none of them, and each
    can rewrite history. The roles of the objects a commit adds are recorded in the
    `chatzeo.server.index.TrustIndex` once ZEO has finished it.

Threads: all of this runs in ZEO's asyncio loop thread (see `chatzeo.server.rules`).
"""

from __future__ import annotations

import logging
from typing import Any

from ZEO.asyncio.server import Delay, ServerProtocol

from ..errors import TrustViolation
from .index import IndexUpdate, TrustIndex
from .protocol import ChatZEOStorage
from .rules import check_commit

__all__ = ["GuardedZEOStorage", "install_guard"]

log = logging.getLogger(__name__)


class GuardedZEOStorage(ChatZEOStorage):
    """A ZEO client handler that checks every commit against `chatzeo.server.rules`."""

    _pending: IndexUpdate | None = None
    # This transaction's stores, kept beside ZEO's commit log so that the check
    # need not read that file back; and the first operation the guard refuses.
    _stored: list[tuple[bytes, bytes, bytes]]
    _refused: str | None = None

    def __init__(
        self, server: Any, read_only: Any, index: TrustIndex, identities: bool = True
    ) -> None:
        super().__init__(server, read_only)
        self._index = index
        self._identities = identities

    def notify_connected(self, conn: Any) -> None:
        super().notify_connected(conn)  # reads the certificate's name into ``identity``
        if self._identities:
            # ascii(): a CN is the certificate owner's text, and may hold escapes.
            self.log(f"client certificate identity: {self.identity!a}")

    def tpc_begin(self, id: Any, *args: Any, **kw: Any) -> None:
        fresh = self.transaction is None
        super().tpc_begin(id, *args, **kw)
        if fresh:
            self._stored = []
            self._refused = None

    def storea(self, oid: bytes, serial: bytes, data: bytes, id: Any) -> None:
        super().storea(oid, serial, data, id)
        self._stored.append((oid, serial, data))

    def deleteObject(self, oid: bytes, serial: bytes, id: Any) -> None:  # noqa: N802
        super().deleteObject(oid, serial, id)
        if oid in self._index.roles:
            self._refused = self._refused or "history: deleting an object is not accepted"

    def restorea(self, *args: Any) -> None:
        super().restorea(*args)
        self._refused = self._refused or "history: restore is not accepted"

    def undoa(self, *args: Any) -> None:
        super().undoa(*args)
        self._refused = self._refused or "history: undo is not accepted"

    def _vote(self, delay: Any = None) -> Any:
        if self.connected and self.transaction is not None:
            try:
                self._pending = check_commit(
                    self.identity, self._stores(), self.storage, self._index,
                    enforce_identity=self._identities,
                )
            except TrustViolation as refusal:
                log.warning(
                    "refused a commit from %s (certificate %s): %s",
                    self.log_label, ascii(self.identity), refusal,
                )
                self._clear_transaction()
                raise
        return super()._vote(delay)

    def tpc_finish(self, id: Any) -> Any:
        pending = self._pending
        result = super().tpc_finish(id)
        if pending is not None and result is not None:
            # ZEO still holds the commit lock: the last transaction is this one. The
            # oids tpc_vote reported were merged by conflict resolution.
            self._index.apply(pending, self.storage.lastTransaction(), self.serials)
        return result

    def _clear_transaction(self) -> None:
        self._pending = None
        super()._clear_transaction()

    def _stores(self) -> list[tuple[bytes, bytes, bytes]]:
        if self.blob_log:
            raise TrustViolation("structure: blobs are not accepted")
        if self._refused:
            raise TrustViolation(self._refused)
        return self._stored


def install_guard(server: Any, storage: Any, *, identities: bool = True) -> TrustIndex:
    """Make every new connection of ``server`` (ZEO's `StorageServer`) a
    `GuardedZEOStorage` over ``storage``'s graph. Call before the server loops.

    ``identities``: the server has TLS client certificates, so the identity rules
    apply too; without it only the record rules do."""
    index = TrustIndex.build(storage)
    # The warning in `GuardedZEOStorage._vote` says it all; ZEO would add a traceback.
    for quiet in (ServerProtocol, Delay):
        if TrustViolation not in quiet.unlogged_exception_types:
            quiet.unlogged_exception_types += (TrustViolation,)
    server.create_client_handler = lambda: GuardedZEOStorage(
        server, server.read_only, index, identities
    )
    log.info(
        "commits are checked against chatzeo's record rules%s (%d objects of %d rooms known)",
        " and client certificates" if identities else "", len(index.roles), len(index.rooms),
    )
    return index
