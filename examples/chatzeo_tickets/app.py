"""The Pyramid application: pages, posting, closing, and the live Server-Sent Events stream.

Connections and transactions
    Each request gets a connection from the database's pool (pyramid_zodbconn), bound
    to the request's own transaction manager (pyramid_tm, explicit mode); pyramid_tm
    commits when the view returns and aborts when it raises, and pyramid_retry runs
    the whole request again (3 attempts) on a `ConflictError`. So views only change
    objects: ``ticket.discussion.post(...)`` joins the request's transaction, and a
    close and its "closed by" message commit together or not at all.

The live stream
    ``GET /tickets/N/events`` answers ``text/event-stream``. It notes the room's oid
    while it still has the request's connection, and then streams from a
    `chatzeo.watch` with a connection of its own: the pooled one goes back to the pool
    as the view returns (pyramid_zodbconn's finished callback), before waitress
    iterates the stream. Each event's id is the message key, so a browser that
    reconnects sends ``Last-Event-ID`` and resumes exactly where it was. The stream
    ends when the browser goes away (waitress's ``client_disconnected``, checked every
    second, or a failed write) or the server stops (`Streams.stop_all`); at most
    ``max_streams`` run at once, since each holds one of waitress's threads.

Threads: waitress runs each request, and each stream, on one of its worker threads;
`Streams` is shared between them and locked.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from BTrees.IOBTree import IOBTree
from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPBadRequest, HTTPForbidden, HTTPNotFound
from pyramid.request import Request
from pyramid.response import Response
from pyramid_zodbconn import get_connection

import chatzeo
from chatzeo import InvalidInput, Message

from .models import AlreadyClosed, Refused, Ticket, add_ticket, newest

__all__ = ["make_app", "Streams", "ensure_root"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
HISTORY = 100  # messages a page shows when it loads; older ones stay in the room
HEARTBEAT = 15.0  # seconds between keep-alive comments on a quiet stream


class Streams:
    """The live streams running now, so that the server can end them when it stops."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._watches: set[chatzeo.Watch] = set()
        self._admitted = 0

    def admit(self) -> bool:
        with self._lock:
            if self.stopping.is_set() or self._admitted >= self.limit:
                return False
            self._admitted += 1
            return True

    def started(self, watching: chatzeo.Watch) -> None:
        with self._lock:
            self._watches.add(watching)

    def ended(self, watching: chatzeo.Watch | None) -> None:
        with self._lock:
            self._admitted -= 1
            self._watches.discard(watching)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._admitted

    def stop_all(self) -> None:
        """End every stream (from any thread): each one's watch wakes and returns."""
        self.stopping.set()
        with self._lock:
            watches = list(self._watches)
        for watching in watches:
            watching.stop()


def ensure_root(db: Any) -> None:
    """Create the application's root object once (a private, retried transaction)."""

    def create(connection: Any) -> None:
        root = connection.root()
        if "tickets" not in root:
            root["tickets"] = IOBTree()

    chatzeo.run_in_transaction(db, create, what="creating the tickets root")


def make_app(db: Any, *, max_streams: int = 6, fault_injection: bool = False) -> Any:
    """The WSGI application over ``db`` (opened by the caller, who closes it).

    ``fault_injection`` lets a close request carry ``fail_after_close=1``: the view
    then raises after closing and posting, as a crash at that point would, so that
    tests can show the request's transaction rolls both back."""
    ensure_root(db)
    settings = {
        "tm.manager_hook": "pyramid_tm.explicit_manager",
        "retry.attempts": 3,
        "tickets.fault_injection": fault_injection,
    }
    config = Configurator(settings=settings)
    config.include("pyramid_retry")
    config.include("pyramid_tm")
    config.include("pyramid_zodbconn")
    # pyramid_zodbconn opens databases from ``zodbconn.uri``; this one comes opened,
    # with chatzeo's client (and its allowlisting class factory) underneath.
    config.registry._zodb_databases = {"": db}
    config.registry.streams = Streams(max_streams)
    config.add_static_view("static", str(STATIC), cache_max_age=0)
    config.add_route("home", "/")
    config.add_route("create", "/tickets")
    config.add_route("ticket", r"/tickets/{number:\d{1,9}}")
    config.add_route("post", r"/tickets/{number:\d{1,9}}/messages")
    config.add_route("close", r"/tickets/{number:\d{1,9}}/close")
    config.add_route("events", r"/tickets/{number:\d{1,9}}/events")
    config.add_route("status", "/status")
    config.add_view(home, route_name="home", request_method="GET")
    config.add_view(create, route_name="create", request_method="POST")
    config.add_view(ticket_page, route_name="ticket", request_method="GET")
    config.add_view(post_message, route_name="post", request_method="POST")
    config.add_view(close_ticket, route_name="close", request_method="POST")
    config.add_view(events, route_name="events", request_method="GET")
    config.add_view(status, route_name="status", request_method="GET")
    config.add_view(refused, context=InvalidInput)
    config.add_view(refused, context=Refused)
    config.add_view(failed, context=Exception)
    config.add_subscriber(check_origin, "pyramid.events.NewRequest")
    # Events after commit: logged only once a request's transaction committed, so a
    # close that failed (and rolled back) never shows up here.
    chatzeo.subscribe(_log_posted)
    return config.make_wsgi_app()


def _log_posted(event: chatzeo.MessagePosted) -> None:
    # %r: the text is untrusted, and must not forge log lines.
    log.info("committed to %s by %s: %r", event.room, event.message.author,
             event.message.text[:80])


# -- helpers -----------------------------------------------------------------------


def _tickets(request: Request) -> IOBTree:
    return get_connection(request).root()["tickets"]


def _ticket(request: Request) -> Ticket:
    ticket = _tickets(request).get(int(request.matchdict["number"]))
    if ticket is None:
        raise HTTPNotFound(f"no ticket {request.matchdict['number']}")
    return ticket


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def check_origin(event: Any) -> None:
    """Refuse a POST another site's page makes the browser send (browsers add Origin)."""
    request = event.request
    origin = request.headers.get("Origin")
    if request.method == "POST" and origin is not None and origin != request.host_url:
        raise HTTPForbidden("cross-site request refused")


def refused(error: Exception, request: Request) -> Response:
    """Bad input: one clear line, status 400; the transaction is aborted (nothing changed)."""
    status = 409 if isinstance(error, AlreadyClosed) else 400
    return _error(request, status, str(error))


def failed(error: Exception, request: Request) -> Response:
    log.error("request %s %s failed", request.method, request.path, exc_info=error)
    return _error(request, 500, "the server failed; nothing of this request was saved")


def _error(request: Request, status: int, text: str) -> Response:
    if _wants_json(request):
        return Response(json={"error": text}, status=status)
    return Response(_page("Error", f"<p class=error>{html.escape(text)}</p>"), status=status)


def _page(title: str, body: str, attributes: str = "") -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        "<link rel=stylesheet href=/static/style.css></head>"
        f"<body{attributes}><p><a href=/>All tickets</a></p>{body}</body></html>"
    )


def _message_item(message: Message) -> str:
    author = html.escape(message.author or "(anonymous)")
    return (
        f'<li data-key="{message.key}"><span class=author>{author}</span> '
        f"<span class=text>{html.escape(message.text)}</span></li>"
    )


# -- views -------------------------------------------------------------------------


def home(request: Request) -> Response:
    rows = "".join(
        f'<li><a href="/tickets/{t.number}">#{t.number} {html.escape(t.title)}</a> '
        f"<span class=state>{'closed' if t.closed else 'open'}</span></li>"
        for t in newest(_tickets(request))
    )
    body = (
        "<h1>Tickets</h1>"
        f"<ul id=tickets>{rows or '<li>No tickets yet.</li>'}</ul>"
        "<h2>New ticket</h2><form id=create method=post action=/tickets>"
        "<label>Title <input name=title required maxlength=200></label> "
        "<label>Your name <input name=name required maxlength=32></label> "
        "<button>Open ticket</button></form>"
    )
    return Response(_page("Tickets", body))


def create(request: Request) -> Response:
    ticket = add_ticket(
        get_connection(request),
        _tickets(request),
        request.POST.get("title", ""),
        request.POST.get("name", ""),
    )
    return Response(status=303, location=f"/tickets/{ticket.number}")


def ticket_page(request: Request) -> Response:
    ticket = _ticket(request)
    room = ticket.discussion
    shown = room.latest(HISTORY)
    # The stream starts after what this page shows, read in the same snapshot: every
    # later message arrives live, once.
    after = shown[-1].key if shown else room.last_key
    state = f"closed by {html.escape(ticket.closed_by)}" if ticket.closed_by else "open"
    close_form = (
        ""
        if ticket.closed
        else (
            f"<form id=close method=post action=/tickets/{ticket.number}/close>"
            "<label>Your name <input name=name required maxlength=32></label> "
            "<button>Close ticket</button></form>"
        )
    )
    body = (
        f"<h1>#{ticket.number} {html.escape(ticket.title)}</h1>"
        f"<p>State: <span id=state>{state}</span> · room <code>{html.escape(room.name)}</code>"
        " · <span id=live>connecting…</span></p>"
        f"<ol id=messages>{''.join(_message_item(m) for m in shown)}</ol>"
        f"<form id=post method=post action=/tickets/{ticket.number}/messages>"
        "<label>Your name <input name=name required maxlength=32></label> "
        "<label>Message <input name=text required autocomplete=off></label> "
        "<button>Send</button> <span id=error role=alert></span></form>"
        f"{close_form}<script src=/static/ticket.js></script>"
    )
    attributes = f' data-events="/tickets/{ticket.number}/events" data-after="{after}"'
    return Response(_page(f"#{ticket.number} {ticket.title}", body, attributes))


def post_message(request: Request) -> Response:
    ticket = _ticket(request)
    message = ticket.discussion.post(request.POST.get("text", ""), request.POST.get("name", ""))
    if _wants_json(request):
        return Response(json={"id": message.id}, status=201)
    return Response(status=303, location=f"/tickets/{ticket.number}")


def close_ticket(request: Request) -> Response:
    ticket = _ticket(request)
    ticket.close(request.POST.get("name", ""))
    if request.registry.settings["tickets.fault_injection"] and request.POST.get(
        "fail_after_close"
    ) == "1":
        raise RuntimeError("fault injected after the close and its message")
    return Response(status=303, location=f"/tickets/{ticket.number}")


def status(request: Request) -> Response:
    """How many live streams run, and how many of the database's connections are open:
    with no request in flight, one per stream (each watch's own), none held by pages."""
    db = request.registry._zodb_databases[""]
    opened = sum(1 for connection in db.pool.all if connection.opened is not None)
    return Response(json={"streams": len(request.registry.streams), "connections": opened})


def events(request: Request) -> Response:
    ticket = _ticket(request)
    room = ticket.discussion
    after = _start(request, room)
    streams: Streams = request.registry.streams
    if not streams.admit():
        return Response("too many live pages; reload later\n", status=503,
                        content_type="text/plain")
    try:
        watching = chatzeo.watch(get_connection(request).db(), room, after=after)
    except BaseException:
        streams.ended(None)
        raise
    gone = request.environ.get("waitress.client_disconnected", lambda: False)
    response = Response(content_type="text/event-stream", charset="utf-8")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # a proxy in front must not buffer it
    response.app_iter = _Stream(watching, streams, gone)
    return response


def _start(request: Request, room: Any) -> int:
    """Where a stream starts: after the browser's ``Last-Event-ID`` (a reconnect), else
    after ``?after=`` (what the page showed), else now."""
    text = request.headers.get("Last-Event-ID") or request.GET.get("after")
    if text is None:
        return int(room.last_key)
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise HTTPBadRequest("after / Last-Event-ID must be a message key")
    return int(text)


class _Stream:
    """The event stream, as a WSGI app_iter: runs on a waitress thread after the
    request's transaction and connection are gone; only ``watching`` (its own
    connection) touches the database. ``close``, which the WSGI server calls however
    the response ended (even if it never started iterating), releases the watch."""

    def __init__(self, watching: chatzeo.Watch, streams: Streams, gone: Any) -> None:
        self._watching = watching
        self._streams = streams
        self._gone = gone
        self._closed = False
        streams.started(watching)

    def __iter__(self) -> Iterator[bytes]:
        try:
            # Sent at once, so the browser knows the stream is open; 2 s between retries.
            yield b"retry: 2000\n\n"
            quiet_since = time.monotonic()
            while not self._streams.stopping.is_set() and not self._gone():
                batch = self._watching.poll(1.0)
                for message in batch:
                    data = json.dumps(
                        {"key": message.key, "author": message.author, "text": message.text}
                    )
                    yield f"id: {message.key}\ndata: {data}\n\n".encode()
                now = time.monotonic()
                if batch:
                    quiet_since = now
                elif now - quiet_since >= HEARTBEAT:
                    yield b": keep-alive\n\n"  # also how a vanished browser is noticed
                    quiet_since = now
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._watching.close()
            self._streams.ended(self._watching)
