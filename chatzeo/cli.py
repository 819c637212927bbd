"""The ``chatzeo`` command: serve, chat, send, tail, history, unread, rooms, who, ping, check,
pack.

Exit status: 0 on success, 2 for a usage error (bad options, unknown command), 1 with
a one-line ``chatzeo: error: ...`` on standard error for anything else (server
unreachable, bad room name, message refused, ...). No traceback for a user mistake.

Runs in the main thread; `chatzeo chat` hands over to `chatzeo.terminal.app`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transaction.interfaces import TransientError
from ZODB.POSException import POSError

from .client import ChatClient
from .database import DEFAULT_ADDRESS
from .errors import ChatError, InvalidInput, InvalidName, NoSuchRoom
from .message import Message
from .reach import open_for_command
from .retry import RetryPolicy, is_transient
from .terminal.display import plain_line
from .terminal.sanitize import clean
from .validation import (
    MAX_MESSAGE_BYTES,
    check_room_name,
    check_user_name,
    checked_text,
    decode_text,
)

__all__ = ["main", "build_parser", "format_line", "default_name"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DEFAULT_ROOM = "lobby"
# Bounds a user can mean: a day of waiting, a century of keeping old revisions.
MAX_WAIT = 86400.0
MAX_PACK_DAYS = 36500.0
# How often `tail --wait-for-room` looks for the room (a local read: ZEO's cache
# answers it until a commit changes the room list).
ROOM_POLL = 0.5
# Messages a room that appeared during `tail --wait-for-room` may already hold.
WAITED_HISTORY = 10_000


def format_line(message: Message) -> str:
    """One message as a plain, terminal-safe line: ``HH:MM:SS <author> text``, dated
    when it is not from today (the terminal's formatter, `plain_line`)."""
    return plain_line(message, time.time())


def default_name() -> str:
    """``$CHATZEO_NAME``, else the login name made into a valid user name, else ``guest``.

    A login name may hold characters chatzeo names may not (``John Doe``); those are
    dropped rather than refusing to start, and the result is cut to the limit.
    """
    explicit = os.environ.get("CHATZEO_NAME")
    if explicit:
        return explicit
    try:
        login = getpass.getuser()
    except Exception:  # no login name (e.g. a uid with no passwd entry)
        return "guest"
    name = re.sub(r"[^A-Za-z0-9._-]", "", login).lstrip("._-")[:32]
    try:
        return check_user_name(name)
    except InvalidName:
        return "guest"


def _resolve_connection(args: argparse.Namespace) -> None:
    """Fill in ``args.server``, ``args.ssl_context`` and ``args.name`` from the
    options, the environment and the identity file.

    The identity file is ``--identity``, else ``$CHATZEO_IDENTITY``, else the
    default per-user one if it exists and no ``--tls-*`` option is given and the
    server asked for (if any) is the one it names. Its certificate's name is the
    default ``--name``; a different ``--name`` is refused, since the server would
    refuse every commit under it. Without any, a loopback server protects no name.
    """
    from .tls import context_from_options, default_identity_path, load_identity

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
            args.name = default_name()
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
    parser.add_argument("--version", action="version", version=f"chatzeo {_version()}")
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
                "--wait", type=_seconds, default=10.0, metavar="SECONDS",
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
        help="auto: check every commit against chatzeo's record rules, and with <ssl> against "
        "client certificates too; on: the same, <ssl> required; off: no checks (plain ZEO)",
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
    serve.add_argument(
        "--operator", action="append", default=[], metavar="NAME",
        help="under TLS, a certificate name that may pack (repeatable; without TLS any "
        "loopback or unix-socket client may)",
    )
    serve.add_argument(
        "--protocol-checks", choices=("on", "off"), default="on",
        help="off serves every ZEO call unchecked: only to measure what the checks cost",
    )

    name_help = ("(default: the identity's name, else $CHATZEO_NAME, else your login name: "
                 f"{default_name()})")
    chat = command("chat", "talk in a room, in this terminal", room=True)
    chat.add_argument("--name", default=None, help=f"your user name {name_help}")
    chat.add_argument("--no-bell", action="store_true",
                      help="do not ring the terminal's bell when someone mentions you")

    send = command("send", "post one message", room=True)
    send.add_argument("--name", default=None, help=f"author name {name_help}")
    # nargs="*" only to say what to do about `send hi there`: one argument is posted.
    send.add_argument("text", nargs="*", metavar="TEXT",
                      help="the message, quoted as one argument, or - to read standard input")

    tail = command("tail", "print messages as they arrive, until interrupted", room=True)
    tail.add_argument(
        "--history", type=_count, default=0, metavar="N", help="print the last N first"
    )
    tail.add_argument("--json", action="store_true", help="print JSON lines")
    tail.add_argument(
        "--after", type=_count, metavar="KEY",
        help="first print every message after KEY (a message's \"key\" in --json output)",
    )
    tail.add_argument("--wait-for-room", action="store_true",
                      help="if the room does not exist yet, wait for someone to create it")

    history = command("history", "print a room's latest messages", room=True)
    history.add_argument("--limit", type=_count, default=50, metavar="N")
    history.add_argument("--json", action="store_true", help="print JSON lines")
    history.add_argument(
        "--after", type=_count, metavar="KEY",
        help="the first N messages after KEY instead of the latest (page on from the last key)",
    )

    unread = command("unread", "list a user's joined rooms with unread messages and mentions")
    unread.add_argument("--name", default=None, help=f"the user {name_help}")
    unread.add_argument("--json", action="store_true", help="print JSON lines")

    init_db = command("init-db", "prepare a database (PostgreSQL: schema and trigger)", False)
    init_db.add_argument(
        "target",
        nargs="?",
        default=os.environ.get("CHATZEO_SERVER", DEFAULT_ADDRESS),
        help="postgres:// URI, ZConfig file or any other target (default: $CHATZEO_SERVER)",
    )
    init_db.add_argument("--wait", type=_seconds, default=10.0, metavar="SECONDS",
                         help="seconds to wait for it")

    command("ping", "say whether a chatzeo server answers (exit 0) or why not (exit 1)")

    rooms = command("rooms", "list rooms and their message counts")
    rooms.add_argument("--json", action="store_true", help="print JSON lines")
    who = command("who", "list users present in a room", room=True)
    who.add_argument("--json", action="store_true", help="print JSON lines")

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
    pack.add_argument("--days", type=_days, default=0.0,
                      help="keep old revisions younger than this (default: %(default)s)")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chatzeo")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _number(text: str, what: str, maximum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of {what}, not {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= maximum):
        raise argparse.ArgumentTypeError(
            f"expected a number of {what} from 0 to {maximum:g}, not {text!r}"
        )
    return value


def _seconds(text: str) -> float:
    return _number(text, "seconds", MAX_WAIT)


def _days(text: str) -> float:
    return _number(text, "days", MAX_PACK_DAYS)


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
    except (OSError, POSError) as error:
        # The storage itself failed (the server's disk is full, a file vanished):
        # not the user's mistake, but still one line, and nothing half-written
        # (the server aborted the transaction).
        print(f"chatzeo: error: the storage failed: {type(error).__name__}: "
              f"{_one_line(error)}", file=sys.stderr)
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
    db = open_for_command(args.server, args.wait, _tls(args), _cert(args))
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


def _cert(args: argparse.Namespace) -> str | None:
    from .tls import TLS_ENVIRONMENT

    # An identity file holds the certificate too (the first one in it).
    return (args.tls_cert or os.environ.get(TLS_ENVIRONMENT["cert"])
            or getattr(args, "identity", None) or os.environ.get("CHATZEO_IDENTITY") or None)


def _tls(args: argparse.Namespace) -> Any:
    return args.ssl_context


_FILESTORAGE_MAGIC = (b"FS30", b"FS21")


def _check(args: argparse.Namespace) -> int:
    from .errors import StorageDamaged
    from .maintenance import check_file

    path: Path = args.path
    if not path.exists():
        raise ChatError(f"no such file: {path}")
    if path.is_dir():
        raise ChatError(f"{path} is a directory; give the data file, e.g. {path / 'chat.fs'}")
    if not path.is_file():
        raise ChatError(f"{path} is not a regular file, so not a FileStorage data file")
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise ChatError(f"cannot read {path}: {error.strerror}") from None
    if magic not in _FILESTORAGE_MAGIC:
        # Every FileStorage file starts so (FS30 under Python 3, FS21 for files
        # written by Python 2); anything else is another kind of file, not a
        # damaged data file.
        raise ChatError(f"{path} is not a FileStorage data file (it does not start with FS30)")
    try:
        counts = check_file(path)
    except StorageDamaged as damaged:
        # The report: every problem, one a line (each already made printable).
        for problem in damaged.problems:
            print(f"{path}: {problem}")
        raise
    print(f"{args.path}: ok ({counts['objects']} objects, {counts['rooms']} rooms, "
          f"{counts['messages']} messages)")
    return EXIT_OK


def _pack(args: argparse.Namespace) -> int:
    from .maintenance import pack

    db = open_for_command(args.server, args.wait, _tls(args), _cert(args))
    try:
        pack(db, args.days)
    finally:
        db.close()
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from .server.serve import serve

    data_dir: Path | None = args.data_dir
    if data_dir is not None and data_dir.exists() and not data_dir.is_dir():
        raise ChatError(f"--data-dir {data_dir} is a file; it must be a directory")
    try:
        return serve(
            args.config, args.address, args.data_dir, args.guard, args.max_connections,
            operators=tuple(args.operator), protocol_checks=args.protocol_checks == "on",
            tls=args.tls, private_rooms=args.private_rooms == "on",
        )
    except OSError as error:  # e.g. a data directory that cannot be created
        where = f": {error.filename}" if error.filename else ""
        raise ChatError(f"cannot serve: {error.strerror or error}{where}") from None


def _authority(args: argparse.Namespace) -> tuple[Any, Any]:
    """The server's CA (`chatzeo.server.identity.Authority`) and its config, found the way
    `chatzeo serve` finds its data directory."""
    from .database import default_data_dir
    from .server.identity import Authority
    from .server.serve import default_config_path, load_config

    data_dir = args.data_dir
    packaged = args.config is None and not os.environ.get("CHATZEO_CONFIG") and not Path(
        "zeo.conf").is_file()
    if packaged and data_dir is None:
        data_dir = default_data_dir()
    config = load_config(args.config or default_config_path(), None, data_dir)
    return Authority(Path(config.chatzeo_data_dir) / "tls"), config


def _invite(args: argparse.Namespace) -> int:
    from .server.identity import issue, save_identity
    from .tls import IDENTITY_SUFFIX

    user = check_user_name(args.user)
    authority, config = _authority(args)
    address = args.address
    if address is None:
        bound = config.zeo.address.address
        address = f"{bound[0]}:{bound[1]}" if isinstance(bound, tuple) else str(bound)
    out = args.out or Path(f"{user}{IDENTITY_SUFFIX}")
    if out.exists():
        raise InvalidInput(f"{out} exists already; remove it or pass --out FILE")
    text, serial = issue(authority, user, server=address)
    save_identity(out, text)
    print(f"wrote {out} for {user} (certificate {serial}); give it to {user} privately:")
    print(f"  chatzeo chat --identity {out}")
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    from .server.identity import revoke

    user = check_user_name(args.user)
    authority, _ = _authority(args)
    serials = revoke(authority, user)
    print(f"revoked {len(serials)} certificate(s) of {user}; a running server closes "
          "their connections within a second and refuses them from now on")
    return EXIT_OK


def _chat(args: argparse.Namespace) -> int:
    from .terminal.app import run_chat

    user, room = check_user_name(args.name), check_room_name(args.room)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise ChatError("chatzeo chat needs a terminal; scripts can use chatzeo send and tail")
    # Said at once, so a slow or absent server is never a blank screen.
    print(f"chatzeo: connecting to {clean(str(args.server))} as {user}...", flush=True)
    db = open_for_command(args.server, args.wait, _tls(args), _cert(args))
    return run_chat(db, user, room, str(args.server), bell=not args.no_bell)  # closes db


def _send(args: argparse.Namespace) -> int:
    if len(args.text) != 1:
        words = " ".join(args.text)
        example = f"chatzeo send {_quoted(words or 'hello there')}"
        print(f"chatzeo send: error: give the message as one argument: quote it, e.g. "
              f"{example}", file=sys.stderr)
        return EXIT_USAGE
    args.text = args.text[0]
    # Checked once, here, before connecting: a bad message never costs a round trip,
    # and the checked text is stored without checking it again.
    if args.text == "-":
        text = decode_text(sys.stdin.buffer.read(MAX_MESSAGE_BYTES * 4 + 1))
    else:
        text = checked_text(args.text)
    room = check_room_name(args.room)
    name = check_user_name(args.name)

    def send(client: ChatClient) -> int:
        client.join(room, history=0)
        client.send(text, read_back=False)  # nothing is printed: its key is not needed
        return EXIT_OK

    return _with_client(args, send, user=name)


def _quoted(text: str) -> str:
    import shlex

    shown = text if len(text) <= 40 else text[:37] + "..."
    return shlex.quote(clean(shown))


def _print(message: Message, as_json: bool) -> None:
    if as_json:
        print(json.dumps(message.as_json(), ensure_ascii=False), flush=True)
    else:
        print(format_line(message), flush=True)


def _tail(args: argparse.Namespace) -> int:
    room = check_room_name(args.room)

    def tail(client: ChatClient) -> int:
        # With --after, everything after KEY: a script resumes exactly where it stopped.
        count = None if args.after is not None else args.history
        first = _join_existing(client, room, count, args.wait_for_room, args.after)
        for message in first:
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


def _join_existing(
    client: ChatClient, room: str, history: int | None, wait_for_it: bool,
    after: int | None = None,
) -> list[Message]:
    """Join ``room`` without creating it: reading commands never create rooms, so a
    typo is reported instead of becoming a room for ever."""
    announced = False
    while True:
        try:
            # A room that appeared while we waited is new from its first message on.
            if announced and after is None:
                history = WAITED_HISTORY
            return client.join(room, history=history, create=False, after=after)
        except NoSuchRoom:
            if not wait_for_it:
                raise NoSuchRoom(room) from None
        if not announced:
            print(f"chatzeo: no room named {room!r} yet; waiting for it", file=sys.stderr)
            announced = True
        time.sleep(ROOM_POLL)


def _history(args: argparse.Namespace) -> int:
    def history(client: ChatClient) -> int:
        page = client.join(args.room, history=args.limit, create=False, after=args.after)
        for message in page:
            _print(message, args.json)
        return EXIT_OK

    return _with_client(args, history)


def _unread(args: argparse.Namespace) -> int:
    name = check_user_name(args.name)

    def unread(client: ChatClient) -> int:
        for room in client.unread(name):
            if args.json:
                print(json.dumps(room.as_json(), ensure_ascii=False), flush=True)
                continue
            line = f"#{room.room}\t{room.unread} unread\t{room.mentions} mentions"
            if room.lost:
                line += f"\t{room.lost} lost to retention"
            print(line, flush=True)
        return EXIT_OK

    # An anonymous client: reading someone's counts neither connects nor writes.
    return _with_client(args, unread)


def _init_db(args: argparse.Namespace) -> int:
    from .initdb import init_db

    for line in init_db(args.target, wait=args.wait):
        print(line)
    return EXIT_OK


def _ping(args: argparse.Namespace) -> int:
    from .reach import is_server_address, wait_for_server

    if not is_server_address(args.server):
        raise ChatError(f"ping needs a server address (host:port or a socket), not {args.server!r}")
    wait_for_server(args.server, _tls(args), args.wait, cert=_cert(args))
    print(f"a chatzeo server answers at {clean(args.server)}")
    return EXIT_OK


def _rooms(args: argparse.Namespace) -> int:
    def rooms(client: ChatClient) -> int:
        for name, count in client.rooms():
            if args.json:
                print(json.dumps({"room": name, "messages": count}, ensure_ascii=False))
            else:
                print(f"{clean(name)}\t{count}")
        return EXIT_OK

    return _with_client(args, rooms)


def _who(args: argparse.Namespace) -> int:
    room = check_room_name(args.room)

    def who(client: ChatClient) -> int:
        names = client.who(room)
        if args.json:
            print(json.dumps({"room": client.find_room(room), "present": names},
                             ensure_ascii=False))
        else:
            for name in names:
                print(clean(name))
        return EXIT_OK

    return _with_client(args, who)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _serve,
    "chat": _chat,
    "send": _send,
    "tail": _tail,
    "history": _history,
    "unread": _unread,
    "init-db": _init_db,
    "ping": _ping,
    "rooms": _rooms,
    "who": _who,
    "check": _check,
    "invite": _invite,
    "revoke": _revoke,
    "pack": _pack,
}
