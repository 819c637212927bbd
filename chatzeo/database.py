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

import os
import re
import ssl as ssl_module
import stat
from pathlib import Path
from typing import Any

import ZODB
import ZODB.config
import ZODB.FileStorage
import zodburi
from ZEO.Exceptions import ClientDisconnected
from ZODB.POSException import ReadConflictError

from . import postgres
from .allowlist import class_factory, guard_conflict_resolution
from .errors import (
    InvalidTarget,
    ServerUnavailable,
)
from .zeoclient import ChatClientStorage, RefusalCatcher

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
    with RefusalCatcher() as refusals:
        try:
            storage = ChatClientStorage(
                address, wait_timeout=wait, ssl=ssl, ssl_server_hostname=None, vote_timeout=wait
            )
        except ClientDisconnected:
            if refusals.reason:
                raise ServerUnavailable(shown, wait, refusals.reason) from None
            raise ServerUnavailable(shown, wait) from None
    # Whether this client proves its name with a certificate (chatzeo.client asks).
    storage._chatzeo_ssl = ssl is not None
    return _db(storage, db_options, shown=shown, wait=wait)


def _open_uri(uri: str, wait: float, db_options: dict[str, Any]) -> ZODB.DB:
    if uri.startswith("postgres://"):
        storage, uri_options = postgres.open_uri(uri, wait)
    else:
        try:
            factory, uri_options = zodburi.resolve_uri(uri)
        except Exception as error:
            raise InvalidTarget(uri, _one_line(error)) from None
        try:
            storage = factory()
        except ClientDisconnected:
            raise ServerUnavailable(uri, wait) from None
    return _db(storage, {**uri_options, **db_options}, shown=uri, wait=wait)


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
