"""Every error chatzeo raises, under one base class.

Errors a caller should retry are `transaction.interfaces.TransientError`s, so the
transaction manager's ``attempts()`` and `chatzeo.retry` treat them like conflicts.
Bad input is a `ValueError`, so code that validates generically still catches it.
"""

from __future__ import annotations

from transaction.interfaces import TransientError
from ZODB.POSException import POSError, StorageError

__all__ = [
    "ChatError",
    "NoSuchUser",
    "DatabaseNotPrepared",
    "InvalidInput",
    "InvalidName",
    "InvalidMessage",
    "InvalidTarget",
    "RetryLimitExceeded",
    "ServerUnavailable",
    "TooManyConnections",
    "NotInDatabase",
    "NoSuchRoom",
    "UnsafeRecord",
    "TrustViolation",
    "MalformedRecord",
    "ProtocolViolation",
    "CommitLockTimeout",
    "IdentityError",
    "ServerConfigError",
    "InvalidCommand",
    "AmbiguousRoom",
    "StorageDamaged",
    "PrivateRoomsNeedTLS",
    "NotOwner",
    "NotAMember",
    "CertificateRefused",
    "ServerNotTrusted",
    "NotAZEOServer",
]


class ChatError(Exception):
    """Base class of every error chatzeo raises on purpose."""


class InvalidInput(ChatError, ValueError):
    """Input was refused before anything was written."""


class InvalidName(InvalidInput):
    """A room or user name is empty, too long or has characters names may not have."""

    def __init__(self, kind: str, name: object, reason: str):
        self.kind = kind
        self.name = name
        self.reason = reason
        super().__init__(f"invalid {kind} name {name!r}: {reason}")


class InvalidMessage(InvalidInput):
    """A message's text is empty, too big, not valid UTF-8 or holds a forbidden character."""


class InvalidTarget(InvalidInput):
    """A database target (server address, URI or config file) cannot be understood."""

    def __init__(self, target: object, reason: str):
        self.target = target
        self.reason = reason
        super().__init__(f"invalid database target {target!r}: {reason}")


class RetryLimitExceeded(ChatError):
    """A transaction kept failing with transient errors (conflicts, a lost server)
    until its retry budget ran out. ``last_error`` is the final transient error."""

    def __init__(self, what: str, attempts: int, seconds: float, last_error: BaseException):
        self.attempts = attempts
        self.seconds = seconds
        self.last_error = last_error
        super().__init__(
            f"{what} failed after {attempts} attempts in {seconds:.1f}s: "
            f"{type(last_error).__name__}: {last_error}"
        )


class ServerUnavailable(ChatError, TransientError):
    """No ZEO server answered at the address within the wait bound."""

    def __init__(self, address: object, seconds: float, refused: str = ""):
        self.address = address
        self.seconds = seconds
        self.refused = refused
        if refused:  # it answered, but would not let this client in
            super().__init__(f"the server at {address} refused this client: {refused}")
        else:
            super().__init__(f"no chatzeo server answered at {address} within {seconds:g}s")


class DatabaseNotPrepared(ChatError):
    """A PostgreSQL database lacks what ``chatzeo init-db`` sets up (RelStorage's
    history-free schema, the NOTIFY trigger), so clients could not be told of commits."""


class TooManyConnections(ChatError):
    """A user already holds the maximum number of live connections."""

    def __init__(self, user: str, limit: int):
        self.user = user
        self.limit = limit
        super().__init__(f"user {user!r} already has {limit} live connections (the limit)")


class NotInDatabase(ChatError):
    """`ChatSession.add_message` was called on a session that is not yet committed
    to a database, so there is nothing it could commit the message to."""


class NoSuchRoom(ChatError, LookupError):
    """A command that only reads named a room that does not exist."""

    def __init__(self, room: str):
        self.room = room
        super().__init__(f"no room named {room!r}")


class NoSuchUser(ChatError, LookupError):
    """A command that only reads named a user that never connected."""

    def __init__(self, user: str):
        self.user = user
        super().__init__(f"no user named {user!r} has ever connected")


class UnsafeRecord(ChatError, POSError):
    """A database record names a class outside chatzeo's allowlist; it was not loaded.

    A `POSError`, because ZODB re-raises those from a failed load as they are instead
    of hiding them in a bare ``StateLoadError``.
    """

    def __init__(self, module: str, name: str):
        self.module = module
        self.name = name
        super().__init__(f"refused to load {module}.{name}: not a class chatzeo trusts")


class TrustViolation(ChatError, StorageError):
    """A guarded `chatzeo serve` refused a commit: it forged an author, rewrote or
    deleted history, or changed someone else's object (docs/security.md).
    Nothing of the transaction was written; retrying cannot help. The message names
    the rule. It carries no attributes, so ZEO sends it to the client as its args."""


class MalformedRecord(ChatError):
    """A stored record breaks `chatzeo.records`' rules (written through a plain ZEO
    server, or by an older, unguarded one). Readers show a placeholder for it;
    writing to the object that holds it is refused with this error. ``where``
    names the object, ``problem`` says what is wrong."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{where} holds a malformed record: {problem}; see chatzeo check")


class ProtocolViolation(ChatError, StorageError):
    """`chatzeo serve` refused a call of the ZEO protocol: one chatzeo's clients never
    make (undo, history, iterators, blobs, ...), one reserved to an operator (pack),
    or one whose arguments break its limits (a client-chosen tid or status, an
    extension that is not a plain mapping, a record or transaction above the size
    limits; `chatzeo.server.protocol`). Nothing of the transaction was written; retrying
    cannot help. The message names the rule. It carries no attributes, so ZEO sends
    it to the client as its args."""


class CommitLockTimeout(ChatError, TransientError):
    """A commit waited longer than its bound for the server's commit lock, which
    another writer held; the transaction was aborted, nothing was written. Retryable:
    the server frees the lock of a hung writer after its ``transaction-timeout``."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(
            f"the server's commit lock stayed busy for {seconds:g}s (another writer holds it)"
        )


class IdentityError(ChatError):
    """An identity file, certificate authority or revocation list cannot be used."""


class ServerConfigError(ChatError):
    """The server's config is broken, its port is taken or its storage is locked."""


class InvalidCommand(InvalidInput):
    """A slash command that does not exist or whose argument is wrong."""


class AmbiguousRoom(InvalidInput):
    """A room name matches, without regard to case, several rooms and none exactly
    (a database from before names were matched so may hold ``Dev`` and ``dev``)."""

    def __init__(self, name: str, matches: list[str]):
        self.name = name
        self.matches = matches
        super().__init__(
            f"{name!r} matches several rooms: {', '.join(matches)}; type the exact name"
        )


class StorageDamaged(ChatError):
    """``chatzeo check`` found problems in a data file; ``problems`` lists them."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        # One line; ``chatzeo check`` prints every problem before it.
        shown = "; ".join(problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        super().__init__(f"{path} is damaged: {shown}{more}")


class PrivateRoomsNeedTLS(ChatError):
    """Private rooms were asked of a server (or a connection) without TLS client
    certificates, where every client can read every object."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(
            reason
            or "private rooms need a server with TLS client certificates "
            "(chatzeo serve --tls auto): without them any client can read every room"
        )


class CertificateRefused(ChatError):
    """The server took the TLS handshake but refused this client's certificate
    (signed by another CA, self-signed, expired) or wanted one and got none."""

    def __init__(self, address: str, reason: str):
        self.address = address
        self.reason = reason
        super().__init__(f"the server at {address} refused this certificate: {reason}")


class ServerNotTrusted(ChatError):
    """The server's certificate is not one the client's ``--tls-ca`` vouches for."""

    def __init__(self, address: str, reason: str):
        self.address = address
        self.reason = reason
        super().__init__(
            f"the server at {address} has a certificate --tls-ca does not vouch for: {reason}"
        )


class NotAZEOServer(ChatError):
    """Something accepted the connection but did not greet as a ZEO server."""

    def __init__(self, address: str, reason: str):
        self.address = address
        self.reason = reason
        super().__init__(f"{address} answered, but not as a chatzeo server: {reason}")


class NotOwner(ChatError, PermissionError):
    """Only a private room's owner may invite or remove its members."""


class NotAMember(ChatError, LookupError):
    """A private room this user is not (or no longer) a member of, or no such room:
    the server answers both alike. ``room`` is its key in `ChatClient.open_rooms`
    when it was open (it is closed then), else None."""

    def __init__(self, message: str, room: str | None = None) -> None:
        super().__init__(message)
        self.room = room
