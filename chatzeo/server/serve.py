"""`chatzeo serve`: the ZEO storage server every chat client talks to.

It reads the same ZConfig file as ``runzeo -C zeo.conf`` (ZEO's own schema), applies
the ``--address`` and ``--data-dir`` overrides, creates chatzeo's root objects before
the first client connects (two clients creating the root of an empty storage at once
would conflict), makes conflict resolution load only allowlisted classes, accepts
only the ZEO calls chatzeo's clients make (`chatzeo.server.protocol`), checks every commit
against chatzeo's record rules and, with TLS client certificates, against its
certificate (`chatzeo.server.guard`, ``--guard``), sends each commit only to the
connections that hold what it changed (`chatzeo.server.fanout`), and then runs ZEO's
`StorageServer` until SIGINT or SIGTERM.

Threads: everything here runs in the main thread; the server's network IO runs in
ZEO's asyncio loop, which `StorageServer.loop` runs in that same thread.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import signal
import socket
import ssl
import sys
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import transaction
import zc.lockfile
import ZConfig
import ZEO
import ZODB
from BTrees.OOBTree import OOBTree

from .. import postgres
from ..allowlist import guard_conflict_resolution
from ..database import default_data_dir, parse_address
from ..errors import IdentityError, ServerConfigError
from ..realm import get_root
from .fanout import install_fanout
from .guard import install_guard
from .identity import Revocations, ensure_authority, server_context
from .protocol import ServerPolicy, create_server
from .readguard import install_read_guard, install_revocation_check

__all__ = ["serve", "load_config", "ServerConfigError", "default_config_path"]

log = logging.getLogger(__name__)


def default_config_path() -> Path:
    """``$CHATZEO_CONFIG``, else ``./zeo.conf``, else the copy shipped with chatzeo."""
    explicit = os.environ.get("CHATZEO_CONFIG")
    if explicit:
        return Path(explicit)
    local = Path("zeo.conf")
    if local.is_file():
        return local
    return Path(str(resources.files("chatzeo") / "zeo.conf"))


# A voted transaction holds the commit lock until it finishes; without a timeout a
# client that never finishes would stop every writer (docs/operations.md).
DEFAULT_TRANSACTION_TIMEOUT = 30.0

_DATA_DIR_DEFINE = re.compile(r"^%define\s+DATA_DIR\s+(?P<value>\S.*?)\s*$", re.MULTILINE)


def load_config(
    path: Path, address: str | None = None, data_dir: Path | None = None
) -> Any:
    """Parse a ZEO server config with ZEO's schema and apply the overrides.

    The storage's directory is the config's ``%define DATA_DIR``: ``data_dir`` replaces
    it, a relative one is taken relative to the config file, and it is created if
    missing. Raises `ServerConfigError` with a one-line reason for a file that
    cannot be used.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ServerConfigError(f"cannot read config file {path}: {error}") from None
    define = _DATA_DIR_DEFINE.search(text)
    data_directory: Path | None = None
    if define is None:
        if data_dir is not None:
            raise ServerConfigError(f"config file {path} has no '%define DATA_DIR' to override")
    else:
        directory = Path(data_dir) if data_dir is not None else Path(define["value"])
        if not directory.is_absolute():
            base = Path.cwd() if data_dir is not None else path.parent
            directory = base.resolve() / directory
        directory.mkdir(parents=True, exist_ok=True)
        data_directory = directory
        text = text[: define.start()] + f"%define DATA_DIR {directory}" + text[define.end():]
    schema = ZConfig.loadSchema(os.path.join(os.path.dirname(ZEO.__file__), "schema.xml"))
    try:
        config, _ = ZConfig.loadConfigFile(schema, io.StringIO(text), path.resolve().as_uri())
    except Exception as error:
        reason = " ".join(str(error).split())
        raise ServerConfigError(f"config file {path} is broken: {reason}") from None
    # Where `--tls auto` keeps its CA and the revocation list lives.
    config.chatzeo_data_dir = data_directory or path.resolve().parent
    if address is not None:
        parsed = parse_address(address)
        config.zeo.address = SimpleNamespace(
            family=socket.AF_UNIX if isinstance(parsed, str) else _family(parsed[0]),
            address=parsed,
        )
    return config


def serve(
    config_path: Path | None = None,
    address: str | None = None,
    data_dir: Path | None = None,
    guard: str = "auto",
    max_connections: int | None = None,
    operators: tuple[str, ...] = (),
    protocol_checks: bool = True,
    tls: str = "config",
    private_rooms: bool = True,
) -> int:
    """Run the server until SIGINT or SIGTERM; return the exit status.

    ``tls`` is ``"config"`` (TLS as the config's ``<ssl>`` says, none without one)
    or ``"auto"``: require client certificates signed by the server's own CA in
    ``DATA_DIR/tls``, created on first use (`chatzeo.server.identity`); ``chatzeo invite``
    issues them. With client certificates, private rooms are served to their
    members only (`chatzeo.server.readguard`); a database holding private rooms is
    refused without them. ``private_rooms=False`` serves no private rooms even
    then (no read checks; a database holding some is refused).

    ``max_connections``, if given, becomes the per-user connection limit stored in
    chatzeo's root (`ChatRoot.max_connections`); under TLS the server also counts
    each certificate's live connections against it. ``guard`` is ``"auto"`` (check
    every commit against the record rules, and against client certificates when
    the config has ``<ssl>``), ``"on"`` (the same, and an error without ``<ssl>``)
    or ``"off"`` (no record checks: plain ZEO, for comparison). ``operators`` are the
    certificate names that may pack under TLS. ``protocol_checks=False`` serves
    ZEO's stock handler, only to measure what the checks cost.
    """
    path = config_path or default_config_path()
    packaged = config_path is None and not os.environ.get("CHATZEO_CONFIG") and not Path(
        "zeo.conf"
    ).is_file()
    if packaged and data_dir is None:
        data_dir = default_data_dir()
    config = load_config(path, address, data_dir)
    _setup_logging(config)
    bound = config.zeo.address.address
    _check_port(bound)
    guard_conflict_resolution()
    tls_directory = Path(config.chatzeo_data_dir) / "tls"
    if tls == "auto":
        host = bound[0] if isinstance(bound, tuple) else None
        try:
            authority = ensure_authority(tls_directory, [host] if host else [])
            config.zeo.ssl = server_context(authority)
        except (OSError, IdentityError, ssl.SSLError) as error:
            raise ServerConfigError(f"cannot set up TLS in {tls_directory}: {error}") from None
        log.info("TLS: clients need a certificate from 'chatzeo invite NAME' (CA in %s)",
                 tls_directory)
    elif tls != "config":
        raise ServerConfigError(f"--tls must be auto or config, not {tls!r}")
    guarded = _guarded(config, guard)
    storages = {opener.name or "1": _open_storage(opener) for opener in config.storages}
    _warn_about_shared_databases(storages)
    server = None
    try:
        private = guarded is True and private_rooms
        limits = [_prepare(storage, max_connections, private=private)
                  for storage in storages.values()]
        policy = ServerPolicy(
            operators=frozenset(operators),
            max_connections=min(limits),
            checks=protocol_checks,
        )
        if not protocol_checks:
            log.warning("protocol checks are off: every ZEO call is accepted (measuring only)")
        server = create_server(storages, _server_options(config), policy)
        if guarded is not None:
            storage = next(iter(storages.values()))
            try:
                install_guard(server, storage, identities=guarded)
                if guarded:
                    revocations = Revocations(tls_directory / "revoked.json")
                    if private_rooms:
                        install_read_guard(server, storage, revocations)
                    else:
                        install_revocation_check(server, revocations)
            except Exception as error:
                raise ServerConfigError(
                    f"cannot index the storage for the commit guard: {error}"
                ) from None
        # Last: it wraps whichever connection handler the lines above chose.
        install_fanout(server)
        _handle_signals()
        log.info("chatzeo server listening on %s", _show(server.acceptor.addr))
        server.loop()
    except SystemExit as stop:
        log.info("chatzeo server stopped (%s)", stop.code)
    finally:
        if server is not None:
            server.close()
        else:
            for storage in storages.values():
                storage.close()
    return 0


def _guarded(config: Any, guard: str) -> bool | None:
    """None: no checks (``--guard off``, plain ZEO); False: the record rules only
    (no client certificates); True: the record and identity rules."""
    if guard not in ("auto", "on", "off"):
        raise ServerConfigError(f"--guard must be auto, on or off, not {guard!r}")
    with_certificates = config.zeo.ssl is not None
    if guard == "on" and not with_certificates:
        raise ServerConfigError("--guard on needs TLS client certificates (<ssl> in <zeo>)")
    if guard == "off":
        return None
    if len(config.storages) != 1:
        raise ServerConfigError("the commit guard serves exactly one storage")
    return with_certificates


def _open_storage(opener: Any) -> Any:
    try:
        return opener.open()
    except zc.lockfile.LockError:
        where = getattr(opener.config, "path", opener.name)
        raise ServerConfigError(
            f"storage {where} is locked: another server is already using it"
        ) from None


def _warn_about_shared_databases(storages: dict[str, Any]) -> None:
    """A ZEO server tells its clients only of commits made through itself; over a
    database others can write to (RelStorage), their clients are never told."""
    for name, storage in storages.items():
        if postgres.is_relstorage(storage):
            log.warning(
                "storage %s is a RelStorage database: clients of this server hear only of "
                "commits made through this server, never of those made through another "
                "ZEO server or by clients connected to the database directly (and theirs "
                "never hear of ours). Run exactly one chatzeo serve per database, or "
                "connect every client to the database (docs/scaling.md).",
                name,
            )


def _prepare(storage: Any, max_connections: int | None, private: bool = False) -> int:
    """Create ZODB's root and chatzeo's root in ``storage`` if they are missing,
    set the per-user connection limit if one is given, and return the limit. With
    ``private`` (client certificates and the guards), create the directory of
    private rooms; without, refuse a storage that holds private rooms: anyone could
    read them.

    The DB is dropped without closing it: closing would close the storage the
    server is about to serve.
    """
    db = ZODB.DB(storage)
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    try:
        root = get_root(connection)
        if max_connections is not None and root.max_connections != max_connections:
            root.max_connections = max_connections
        limit = root.max_connections
        if private and root.private is None:
            root.private = OOBTree()
        elif not private and root.private:
            raise ServerConfigError(
                "this database holds private rooms: serve it with client certificates "
                "(--tls auto, or <ssl> in the config) and the guard, or anyone can read them"
            )
        manager.commit()
        return int(limit) if type(limit) is int and limit > 0 else 8
    finally:
        connection.close()


def _check_port(address: Any) -> None:
    if isinstance(address, str):
        return
    host, port = address
    probe = socket.socket(_family(host), socket.SOCK_STREAM)
    # As asyncio's listener does: connections a crashed server left in TIME_WAIT must
    # not block its restart, while a live listener still makes bind fail.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ServerConfigError(
                f"port {port} on {host} is taken: is another chatzeo server running?"
            ) from None
        raise ServerConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    finally:
        probe.close()


def _server_options(config: Any) -> Any:
    zeo = config.zeo
    return SimpleNamespace(
        address=zeo.address.address,
        read_only=zeo.read_only,
        client_conflict_resolution=zeo.client_conflict_resolution,
        msgpack=zeo.msgpack,
        invalidation_queue_size=zeo.invalidation_queue_size,
        invalidation_age=zeo.invalidation_age,
        transaction_timeout=zeo.transaction_timeout or DEFAULT_TRANSACTION_TIMEOUT,
        ssl=zeo.ssl,
    )


def _setup_logging(config: Any) -> None:
    if getattr(config, "eventlog", None) is not None:
        config.eventlog.startup()
        return
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def _handle_signals() -> None:
    def stop(signum: int, frame: Any) -> None:
        sys.exit(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _show(address: Any) -> str:
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)
