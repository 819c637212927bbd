"""``python -m chatzeo_tickets``: serve the ticket tracker with waitress until interrupted.

    python -m chatzeo_tickets [--server 127.0.0.1:8765] [--listen 127.0.0.1:6543]

``--server`` is any target `chatzeo.open_db` takes (a ZEO address by default, so
terminal users share the rooms). SIGINT or SIGTERM ends every live stream, stops
waitress and closes the database; the main thread runs waitress's loop, its worker
threads run the requests and streams.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

import waitress

import chatzeo

from .app import make_app
from .models import class_factory

THREADS = 8


def _listen(text: str) -> tuple[str, int]:
    try:
        address = chatzeo.database.parse_address(text)
    except chatzeo.InvalidInput as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if isinstance(address, str):
        raise argparse.ArgumentTypeError("--listen takes HOST:PORT")
    return address


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatzeo_tickets", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--server",
        default=os.environ.get("CHATZEO_SERVER", chatzeo.database.DEFAULT_ADDRESS),
        help="the database: a ZEO HOST:PORT (default $CHATZEO_SERVER or 127.0.0.1:8765)",
    )
    parser.add_argument("--listen", type=_listen, default=("127.0.0.1", 6543),
                        metavar="HOST:PORT", help="where to serve HTTP (default 127.0.0.1:6543)")
    parser.add_argument("--fault-injection", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ZEO").setLevel(logging.WARNING)
    try:
        db = chatzeo.open_db(args.server, class_factory=class_factory)
    except chatzeo.ChatError as error:
        print(f"chatzeo_tickets: error: {error}", file=sys.stderr)
        return 1
    try:
        # Two threads stay free for pages and posts however many streams are open.
        app = make_app(db, max_streams=THREADS - 2, fault_injection=args.fault_injection)
        host, port = args.listen
        try:
            server: Any = waitress.create_server(
                app, host=host, port=port, threads=THREADS,
                # Read ahead on each connection so that waitress notices a browser that
                # went away while its stream waits (environ's client_disconnected).
                channel_request_lookahead=5, ident="chatzeo_tickets",
                # A form holds a title or one message (4 KiB at most): refuse floods early.
                max_request_body_size=64 * 1024,
            )
        except OSError as error:
            print(f"chatzeo_tickets: error: cannot listen on {host}:{port}: {error.strerror}",
                  file=sys.stderr)
            return 1

        def stop(signum: int, frame: Any) -> None:
            # End the streams first: waitress's loop, interrupted, waits (5 s at most)
            # for its threads, and each stream holds one.
            app.registry.streams.stop_all()
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        print(f"chatzeo_tickets: serving http://{host}:{server.effective_port}/ "
              f"(database {args.server})", file=sys.stderr, flush=True)
        try:
            server.run()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            app.registry.streams.stop_all()
            server.close()
            server.task_dispatcher.shutdown(timeout=10)
    finally:
        db.close()
    print("chatzeo_tickets: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
