"""The ``chatzeo`` command: serve, chat, send, tail, history, rooms, who, check, pack.

Exit status: 0 on success, 2 for a usage error (bad options, unknown command), 1 with
a one-line ``chatzeo: error: ...`` on standard error for anything else (server
unreachable, bad room name, message refused, ...). No traceback for a user mistake.

Runs in the main thread; `chatzeo chat` hands over to `chatzeo.terminal`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transaction.interfaces import TransientError

from .client import ChatClient
from .database import DEFAULT_ADDRESS, open_db
from .errors import ChatError, InvalidInput
from .message import Message
from .retry import RetryPolicy, is_transient
from .sanitize import clean
from .validation import (
    MAX_MESSAGE_BYTES,
    check_room_name,
    check_text,
    check_user_name,
    decode_text,
)

__all__ = ["main", "build_parser", "format_line"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DEFAULT_ROOM = "lobby"


def format_line(message: Message) -> str:
    """One message as a plain, terminal-safe line: ``HH:MM:SS <author> text``."""
    stamp = time.strftime("%H:%M:%S", time.localtime(message.time))
    author = clean(message.author or "anonymous")
    text = clean(message.text)
    if message.kind == "action":
        return f"{stamp} * {author} {text}"
    return f"{stamp} <{author}> {text}"


def _default_name() -> str:
    return os.environ.get("CHATZEO_NAME") or os.environ.get("USER") or "guest"


def _resolve_connection(args: argparse.Namespace) -> None:
    """Fill in ``args.server``, ``args.ssl_context`` and ``args.name`` from the
    options, the environment and the identity file.

    The identity file is ``--identity``, else ``$CHATZEO_IDENTITY``, else the
    default per-user one if it exists and no ``--tls-*`` option is given and the
    server asked for (if any) is the one it names. Its certificate's name is the
    default ``--name``; a different ``--name`` is refused, since the server would
    refuse every commit under it. Without any, a loopback server protects no name.
    """
    from .identity import default_identity_path, load_identity
    from .tls import context_from_options

    explicit = args.identity or os.environ.get("CHATZEO_IDENTITY") or None
    tls_options = any(getattr(args, f"tls_{o}") for o in ("cert", "key", "ca"))
    if explicit and tls_options:
        raise InvalidInput("use either --identity or --tls-cert/--tls-key/--tls-ca")
    requested = args.server or os.environ.get("CHATZEO_SERVER") or None
    identity = None
    if explicit:
        identity = load_identity(Path(explicit))
    elif not tls_options:
        default = default_identity_path()
        if default.is_file():
            found = load_identity(default)
            if requested is None or requested == found.server:
                identity = found
    args.server = requested or (identity.server if identity else None) or DEFAULT_ADDRESS
    if identity is None:
        args.ssl_context = context_from_options(args.tls_cert, args.tls_key, args.tls_ca)
        if getattr(args, "name", "") is None:
            args.name = _default_name()
        return
    args.ssl_context = identity.context
    if getattr(args, "name", "") is None:
        args.name = identity.name
    elif hasattr(args, "name") and args.name != identity.name:
        raise InvalidInput(
            f"--name {args.name} differs from the name in {identity.path} ({identity.name})"
        )


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the one line the module docstring promises."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="chatzeo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, target: bool = True, room: bool = False) -> Any:
        sub = commands.add_parser(name, help=help, description=help)
        if target:
            sub.add_argument(
                "--server",
                default=None,
                help="host:port, socket path, zodburi URI or ZConfig file (default: "
                f"$CHATZEO_SERVER, else the identity file's server, else {DEFAULT_ADDRESS})",
            )
            sub.add_argument(
                "--identity", metavar="FILE",
                help="identity file from 'chatzeo invite' (default: $CHATZEO_IDENTITY, "
                "else ~/.config/chatzeo/identity.chatzeo if it exists)",
            )
            sub.add_argument(
                "--wait", type=float, default=10.0,
                help="seconds to wait for the server to answer, and then for each write "
                "to get through conflicts or a lost server (default: %(default)s)",
            )
            for option, what in (("cert", "client certificate"), ("key", "its key"),
                                 ("ca", "CA that signed the server's certificate")):
                sub.add_argument(f"--tls-{option}", metavar="FILE",
                                 help=f"TLS: {what} (default: $CHATZEO_TLS_{option.upper()})")
        if room:
            sub.add_argument("--room", default=DEFAULT_ROOM, help="room (default: %(default)s)")
        return sub

    serve = command("serve", "run the ZEO server", target=False)
    serve.add_argument("--config", type=Path, help="ZEO config file (default: ./zeo.conf)")
    serve.add_argument("--address", help="listen on host:port or a socket path")
    serve.add_argument("--data-dir", type=Path, help="directory of the FileStorage")
    serve.add_argument(
        "--guard",
        choices=("auto", "on", "off"),
        default="auto",
        help="check commits against client certificates (auto: when <ssl> is configured)",
    )
    serve.add_argument(
        "--tls",
        choices=("auto", "config"),
        default="config",
        help="auto: require client certificates from the server's own CA in DATA_DIR/tls, "
        "created on first use ('chatzeo invite' issues them); config: as zeo.conf says",
    )
    serve.add_argument(
        "--private-rooms",
        choices=("on", "off"),
        default="on",
        help="with client certificates, serve private rooms to their members only "
        "(off: no private rooms, no read checks)",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive,
        metavar="N",
        help="how many connections one user may hold at once (kept in the database; default 8)",
    )

    name_help = "your user name (default: the identity's, else $CHATZEO_NAME or $USER)"
    chat = command("chat", "talk in a room, in this terminal", room=True)
    chat.add_argument("--name", default=None, help=name_help)

    send = command("send", "post one message", room=True)
    send.add_argument("--name", default=None, help=name_help)
    send.add_argument("text", help="the message, or - to read it from standard input")

    tail = command("tail", "print messages as they arrive, until interrupted", room=True)
    tail.add_argument(
        "--history", type=_count, default=0, metavar="N", help="print the last N first"
    )
    tail.add_argument("--json", action="store_true", help="print JSON lines")

    history = command("history", "print a room's latest messages", room=True)
    history.add_argument("--limit", type=_count, default=50, metavar="N")
    history.add_argument("--json", action="store_true", help="print JSON lines")

    init_db = command("init-db", "prepare a database (PostgreSQL: schema and trigger)", False)
    init_db.add_argument(
        "target",
        nargs="?",
        default=os.environ.get("CHATZEO_SERVER", DEFAULT_ADDRESS),
        help="postgres:// URI, ZConfig file or any other target (default: $CHATZEO_SERVER)",
    )
    init_db.add_argument("--wait", type=float, default=10.0, help="seconds to wait for it")

    command("rooms", "list rooms and their message counts")
    command("who", "list users present in a room", room=True)

    check = command("check", "verify a FileStorage data file", target=False)
    check.add_argument("path", type=Path, help="the data file, e.g. var/chat.fs")
    for name, help in (("invite", "issue a user's identity file (run next to the server)"),
                       ("revoke", "revoke every certificate issued to a user")):
        operator = command(name, help, target=False)
        operator.add_argument("user", help="the user name")
        operator.add_argument("--config", type=Path, help="the server's ZEO config file")
        operator.add_argument("--data-dir", type=Path, help="the server's data directory")
        if name == "invite":
            operator.add_argument("--out", type=Path,
                                  help="where to write it (default: ./USER.chatzeo)")
            operator.add_argument("--server", dest="address", metavar="HOST:PORT",
                                  help="the address clients reach the server at, written "
                                  "into the file (default: the config's)")
    pack = command("pack", "pack the storage through the server")
    pack.add_argument("--days", type=float, default=0.0,
                      help="keep old revisions younger than this (default: %(default)s)")
    return parser


def _count(text: str, minimum: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, not {value}")
    return value


def _positive(text: str) -> int:
    return _count(text, minimum=1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``chatzeo`` command; return its exit status."""
    args = build_parser().parse_args(argv)
    _quiet_logging(args.command)
    try:
        if hasattr(args, "identity"):
            _resolve_connection(args)
        return COMMANDS[args.command](args)
    except ChatError as error:
        print(f"chatzeo: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except TransientError as error:
        # A read that met a lost server or a conflict after the retries gave up.
        print(f"chatzeo: error: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # Reader went away (e.g. `chatzeo tail | head`); not an error of ours.
        sys.stderr.close()
        return EXIT_OK


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def _quiet_logging(command: str) -> None:
    # ZEO logs each reconnection attempt; on a client that is noise on stderr (or,
    # in the terminal client, damage to the screen). CHATZEO_LOG=FILE keeps it.
    destination = os.environ.get("CHATZEO_LOG")
    if command == "serve":
        return
    if destination:
        logging.basicConfig(filename=destination, level=logging.INFO)
    else:
        logging.getLogger().addHandler(logging.NullHandler())
        logging.getLogger().setLevel(logging.CRITICAL)


def _client(args: argparse.Namespace, user: str | None = None) -> ChatClient:
    db = open_db(args.server, wait=args.wait, ssl=_tls(args))
    try:
        return ChatClient(db, user, policy=RetryPolicy(max_seconds=args.wait))
    except BaseException:
        db.close()
        raise


def _with_client(
    args: argparse.Namespace, work: Callable[[ChatClient], int], user: str | None = None
) -> int:
    client = _client(args, user)
    try:
        return work(client)
    finally:
        client.close()
        client.db.close()


def _tls(args: argparse.Namespace) -> Any:
    return args.ssl_context


def _check(args: argparse.Namespace) -> int:
    from .maintenance import check_file

    try:
        counts = check_file(args.path)
    except FileNotFoundError:
        print(f"chatzeo: error: no such file: {args.path}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{args.path}: ok ({counts['objects']} objects, {counts['rooms']} rooms, "
          f"{counts['messages']} messages)")
    return EXIT_OK


def _pack(args: argparse.Namespace) -> int:
    from .maintenance import pack

    db = open_db(args.server, wait=args.wait, ssl=_tls(args))
    try:
        pack(db, args.days)
    finally:
        db.close()
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(args.config, args.address, args.data_dir, args.guard, args.max_connections,
                 tls=args.tls, private_rooms=args.private_rooms == "on")


def _authority(args: argparse.Namespace) -> tuple[Any, Any]:
    """The server's CA (`chatzeo.identity.Authority`) and its config, found the way
    `chatzeo serve` finds its data directory."""
    from .database import default_data_dir
    from .identity import Authority
    from .server import default_config_path, load_config

    data_dir = args.data_dir
    packaged = args.config is None and not os.environ.get("CHATZEO_CONFIG") and not Path(
        "zeo.conf").is_file()
    if packaged and data_dir is None:
        data_dir = default_data_dir()
    config = load_config(args.config or default_config_path(), None, data_dir)
    return Authority(Path(config.chatzeo_data_dir) / "tls"), config


def _invite(args: argparse.Namespace) -> int:
    from .identity import IDENTITY_SUFFIX, issue

    user = check_user_name(args.user)
    authority, config = _authority(args)
    address = args.address
    if address is None:
        bound = config.zeo.address.address
        address = f"{bound[0]}:{bound[1]}" if isinstance(bound, tuple) else str(bound)
    out = args.out or Path(f"{user}{IDENTITY_SUFFIX}")
    if out.exists():
        raise InvalidInput(f"{out} exists already; remove it or pass --out FILE")
    from .identity import _write

    text, serial = issue(authority, user, server=address)
    _write(out, text, 0o600, exclusive=True)
    print(f"wrote {out} for {user} (certificate {serial}); give it to {user} privately:")
    print(f"  chatzeo chat --identity {out}")
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    from .identity import revoke

    user = check_user_name(args.user)
    authority, _ = _authority(args)
    serials = revoke(authority, user)
    print(f"revoked {len(serials)} certificate(s) of {user}; a running server closes "
          "their connections within a second and refuses them from now on")
    return EXIT_OK


def _chat(args: argparse.Namespace) -> int:
    from .terminal import run_chat

    return run_chat(args)


def _send(args: argparse.Namespace) -> int:
    if args.text == "-":
        data = sys.stdin.buffer.read(MAX_MESSAGE_BYTES * 4 + 1)
        text = decode_text(data)
    else:
        text = args.text
    # Validate before connecting: a bad message never costs a round trip.
    text, room = check_text(text), check_room_name(args.room)
    name = check_user_name(args.name)

    def send(client: ChatClient) -> int:
        client.join(room, history=0)
        client.send(text)
        return EXIT_OK

    return _with_client(args, send, user=name)


def _print(message: Message, as_json: bool) -> None:
    if as_json:
        print(json.dumps(message.as_json(), ensure_ascii=False), flush=True)
    else:
        print(format_line(message), flush=True)


def _tail(args: argparse.Namespace) -> int:
    def tail(client: ChatClient) -> int:
        for message in client.join(args.room, history=args.history):
            _print(message, args.json)
        behind = False  # a read failed: try again even without a new push
        while True:
            # The wait only watches a local event set by ZEO's push; the timeout
            # just lets Ctrl-C in promptly and costs the server nothing.
            if not (client.wait(1.0) or behind):
                continue
            try:
                messages = client.receive()
            except Exception as error:
                if not is_transient(client.db, error):
                    raise
                # The server is away; ZEO (or RelStorage) reconnects by itself and the
                # cursor has not moved, so the next read picks up everything missed.
                if not behind:
                    print("chatzeo: lost the server; waiting for it", file=sys.stderr)
                behind = True
                continue
            if behind:
                print("chatzeo: reconnected", file=sys.stderr)
                behind = False
            for message in messages:
                _print(message, args.json)

    return _with_client(args, tail)


def _history(args: argparse.Namespace) -> int:
    def history(client: ChatClient) -> int:
        for message in client.join(args.room, history=args.limit, create=False):
            _print(message, args.json)
        return EXIT_OK

    return _with_client(args, history)


def _init_db(args: argparse.Namespace) -> int:
    from .initdb import init_db

    for line in init_db(args.target, wait=args.wait):
        print(line)
    return EXIT_OK


def _rooms(args: argparse.Namespace) -> int:
    def rooms(client: ChatClient) -> int:
        for name, count in client.rooms():
            print(f"{name}\t{count}")
        return EXIT_OK

    return _with_client(args, rooms)


def _who(args: argparse.Namespace) -> int:
    def who(client: ChatClient) -> int:
        for name in client.who(args.room):
            print(name)
        return EXIT_OK

    return _with_client(args, who)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _serve,
    "chat": _chat,
    "send": _send,
    "tail": _tail,
    "history": _history,
    "init-db": _init_db,
    "rooms": _rooms,
    "who": _who,
    "check": _check,
    "invite": _invite,
    "revoke": _revoke,
    "pack": _pack,
}
