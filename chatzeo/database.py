"""`open_db`: the one way chatzeo opens a database, whatever the target names.

Targets
    ``None``                 an embedded FileStorage under the per-user data directory
    ``host:port``            a ZEO server (``[::1]:port`` for IPv6)
    ``/path/to/socket``      a ZEO server on a unix socket
    ``zeo://``, ``file://``, ``memory://`` ...   a zodburi URI
    ``postgres://user@host:port/dbname``   RelStorage on PostgreSQL (the ``pg`` extra);
                             history-free unless the URI says ``keep_history=true``
    ``something.conf``       a ZConfig file with a ``<zodb>`` section (``<relstorage>``
                             too, after ``%import relstorage``)

Every database chatzeo opens loads only the classes in `chatzeo.allowlist`.
Runs in the calling thread; the returned `ZODB.DB` is thread-safe, its connections
are not.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import ssl as ssl_module
import stat
import time
from pathlib import Path
from typing import Any

import ZODB
import ZODB.config
import ZODB.FileStorage
import zodburi
from ZEO.asyncio.client import exc_factories
from ZEO.Exceptions import ClientDisconnected
from ZODB.POSException import ReadConflictError

from .allowlist import class_factory, guard_conflict_resolution
from .errors import (
    CommitLockTimeout,
    InvalidTarget,
    ProtocolViolation,
    ServerUnavailable,
    TooManyConnections,
    TrustViolation,
)
from .fanout import FanoutClientStorage
from .retry import commit_deadline

__all__ = ["open_db", "default_data_dir", "parse_address", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "127.0.0.1:8765"
DEFAULT_WAIT = 10.0

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d+)$")


def default_data_dir() -> Path:
    """Where chatzeo keeps its files: ``$CHATZEO_DATA``, else ``$XDG_DATA_HOME/chatzeo``."""
    explicit = os.environ.get("CHATZEO_DATA")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "chatzeo"


def parse_address(text: str) -> tuple[str, int] | str:
    """A ``host:port`` string as ``(host, port)``, or a unix socket path as given.

    Raises `InvalidTarget` for anything else.
    """
    if text.startswith(("/", "./", "../")):
        return text
    match = _HOST_PORT.match(text)
    if not match:
        raise InvalidTarget(text, "expected host:port, [ipv6]:port or a unix socket path")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise InvalidTarget(text, f"port {port} is out of range 1-65535")
    return (match["v6"] or match["host"], port)


def open_db(
    target: str | os.PathLike[str] | None = None,
    *,
    wait: float = DEFAULT_WAIT,
    ssl: ssl_module.SSLContext | None = None,
    **db_options: Any,
) -> ZODB.DB:
    """Open the database ``target`` names (see the module docstring) and return it.

    A ZEO client waits at most ``wait`` seconds for its server, then raises
    `ServerUnavailable`, and a commit waits at most ``wait`` seconds for the
    server's commit lock, then raises `CommitLockTimeout`; ``ssl`` is the client's TLS
    context for a ZEO server that requires one. Raises `InvalidTarget` for a target it
    cannot understand or a broken config file. ``db_options`` go to `ZODB.DB`.
    """
    db_options.setdefault("class_factory", class_factory)
    guard_conflict_resolution()
    if target is None:
        directory = default_data_dir()
        directory.mkdir(parents=True, exist_ok=True)
        return _db(ZODB.FileStorage.FileStorage(str(directory / "chat.fs")), db_options)
    target = os.fspath(target)
    if "://" in target:
        return _open_uri(target, wait, db_options)
    if target.endswith(".conf") or (os.path.isfile(target) and not _is_socket(target)):
        return _open_config(target, db_options)
    return _open_zeo(parse_address(target), wait, ssl, db_options)


def _open_zeo(
    address: tuple[str, int] | str,
    wait: float,
    ssl: ssl_module.SSLContext | None,
    db_options: dict[str, Any],
) -> ZODB.DB:
    shown = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    with _RefusalCatcher() as refusals:
        try:
            storage = _ClientStorage(
                address, wait_timeout=wait, ssl=ssl, ssl_server_hostname=None, vote_timeout=wait
            )
        except ClientDisconnected:
            if refusals.reason:
                raise ServerUnavailable(shown, wait, refusals.reason) from None
            raise ServerUnavailable(shown, wait) from None
    # Whether this client proves its name with a certificate (chatzeo.client asks).
    storage._chatzeo_ssl = ssl is not None
    return _db(storage, db_options, shown=shown, wait=wait)


class _RefusalCatcher(logging.Handler):
    """Why the server refused this client's registration, if it said: ZEO's client
    only logs it (``Registration or cache validation failed``) and tries again, so
    the caller would see no more than a server that never answered. Listens to
    ZEO's client logger while a connection is opened; if that logger was silent,
    it is made to speak to this handler only."""

    _REASONS = ("this certificate was revoked",)

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reason = ""
        self._logger = logging.getLogger("ZEO.asyncio.client")
        self._saved: tuple[int, bool] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        text = " ".join(str(arg) for arg in (record.args or ()))
        for reason in self._REASONS:
            if reason in text:
                self.reason = reason

    def __enter__(self) -> _RefusalCatcher:
        self._logger.addHandler(self)
        if not self._logger.isEnabledFor(logging.ERROR):
            self._saved = (self._logger.level, self._logger.propagate)
            self._logger.setLevel(logging.ERROR)
            self._logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        if self._saved is not None:
            self._logger.setLevel(self._saved[0])
            self._logger.propagate = self._saved[1]


def register_server_errors() -> None:
    """Make ZEO's client raise chatzeo's own classes for the server's refusals
    (`chatzeo.guard`, `chatzeo.protocol`), which arrive by name. Idempotent; done
    when this module is imported."""
    for refusal in (TrustViolation, ProtocolViolation):
        exc_factories.setdefault(
            f"{refusal.__module__}.{refusal.__name__}",
            lambda _name, args, refusal=refusal: refusal(*args),
        )
    exc_factories.setdefault(
        f"{TooManyConnections.__module__}.{TooManyConnections.__name__}",
        _too_many_connections,
    )


def _too_many_connections(_name: str, args: Any) -> Exception:
    # ZEO sends an exception with attributes as its __dict__.
    if isinstance(args, dict) and isinstance(args.get("user"), str) and type(
        args.get("limit")
    ) is int:
        return TooManyConnections(args["user"], args["limit"])
    return ProtocolViolation(f"too many connections: {args!r}"[:200])


def _open_uri(uri: str, wait: float, db_options: dict[str, Any]) -> ZODB.DB:
    postgres = uri.startswith("postgres://")
    if postgres:
        uri = _history_free(uri)
    try:
        factory, uri_options = zodburi.resolve_uri(uri)
    except Exception as error:
        if postgres and not _has_relstorage():
            reason = "PostgreSQL needs RelStorage: pip install 'chatzeo[pg]'"
            raise InvalidTarget(uri, reason) from None
        raise InvalidTarget(uri, _one_line(error)) from None
    try:
        storage = _retry_unreachable(uri, factory, wait) if postgres else factory()
    except ClientDisconnected:
        raise ServerUnavailable(uri, wait) from None
    return _db(storage, {**uri_options, **db_options}, shown=uri, wait=wait)


def _history_free(uri: str) -> str:
    """chatzeo's PostgreSQL databases are history-free (docs/scaling.md says why)."""
    if "keep_history=" in uri:
        return uri
    return uri + ("&" if "?" in uri else "?") + "keep_history=false"


def _has_relstorage() -> bool:
    try:
        import relstorage  # noqa: F401
    except ImportError:
        return False
    return True


def _retry_unreachable(uri: str, factory: Any, wait: float) -> Any:
    """RelStorage connects at once and fails at once; a ZEO client would wait for
    its server, so wait up to ``wait`` seconds for PostgreSQL too (a restart)."""
    import psycopg2

    deadline = time.monotonic() + wait
    while True:
        try:
            return factory()
        except psycopg2.OperationalError as error:
            reason = _one_line(error)
            if "does not exist" in reason or "authentication" in reason:
                raise InvalidTarget(uri, reason) from None
            if time.monotonic() >= deadline:
                raise ServerUnavailable(uri, wait) from None
            time.sleep(0.1)


def _open_config(path: str, db_options: dict[str, Any]) -> ZODB.DB:
    if not os.path.isfile(path):
        raise InvalidTarget(path, "no such config file")
    try:
        db = ZODB.config.databaseFromURL(Path(path).resolve().as_uri())
    except Exception as error:
        raise InvalidTarget(path, _one_line(error)) from None
    db.classFactory = db_options.get("class_factory", class_factory)
    return db


def _db(storage: Any, db_options: dict[str, Any], shown: str = "", wait: float = 0.0) -> ZODB.DB:
    """Wrap ``storage`` in a DB, closing the storage if that fails.

    Two clients opening a brand-new storage at once race to create the root object and
    one gets ReadConflictError; a second try finds the other's root.
    """
    try:
        try:
            return ZODB.DB(storage, **db_options)
        except ReadConflictError:
            return ZODB.DB(storage, **db_options)
    except ClientDisconnected:
        storage.close()
        raise ServerUnavailable(shown, wait) from None
    except Exception:
        storage.close()
        raise


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class _ClientStorage(FanoutClientStorage):
    """ZEO's client (with `chatzeo.fanout`'s watched fan-out), forgetting on
    disconnect the oids it fetched in advance, and waiting a bounded time for the
    commit lock.

    ZEO keeps pre-fetched oids across a reconnect, but a server that died never
    recorded them as allocated (FileStorage does at commit), so once restarted it
    hands the same oids to other clients: two new objects would share an oid, and
    the connection that loaded one refuses to store the other ("A different object
    already has the same oid"). ``notify_disconnected`` runs in ZEO's IO thread;
    ``new_oid`` then fetches a fresh batch.

    ZEO's vote waits for the server's commit lock without any bound: while another
    writer holds it (up to the server's ``transaction-timeout``) the committing
    thread would block. Here a vote waits at most ``vote_timeout`` seconds, and no
    longer than the retry budget of the `run_in_transaction` it runs in, then
    raises `CommitLockTimeout`; the transaction manager's abort then withdraws the
    vote on the server (its ``tpc_abort`` drops a waiting vote).
    """

    def __init__(self, *args: Any, vote_timeout: float | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.vote_timeout = vote_timeout
        self._unbounded_call: Any = self._call  # type: ignore[has-type]
        self._call = self._bounded_call

    def _bounded_call(self, method: str, *args: Any, **kw: Any) -> Any:
        if method != "vote" or not self.vote_timeout:
            return self._unbounded_call(method, *args, **kw)
        timeout = self.vote_timeout
        deadline = commit_deadline()
        if deadline is not None:
            # Within the retry budget of the write: its caller gives up then anyway.
            timeout = min(timeout, max(0.1, deadline - time.monotonic()))
        future = self._server.call(method, *args, wait=False)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            # Not cancelled: ZEO's IO thread would then meet a cancelled future when
            # a late reply comes. The abort that follows withdraws the vote.
            raise CommitLockTimeout(round(timeout, 1)) from None

    def notify_disconnected(self) -> None:
        self._oids.clear()
        super().notify_disconnected()


register_server_errors()
