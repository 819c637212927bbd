"""`ClientWorker`: the one thread that owns the terminal client's `ChatClient`.

A ZODB connection belongs to one thread, and the terminal's UI thread must never
block on the network, so every call on the `ChatClient` (creating it, joining,
sending, receiving, heartbeats, closing) happens in this worker thread.

Threads
    The worker thread runs `ClientWorker._run`. It sleeps in ``client.wait(timeout)``,
    which returns as soon as ZEO pushes a commit to the watched room (`ChangeFeed`),
    when `submit` wakes it, or at the timeout: the next heartbeat, or while the
    server is away a poll of the *local* connection flag (no request to the
    server) that backs off from ``poll`` to ``away_poll_max`` seconds; ZEO's
    reconnection wakes it at once anyway, through the feed. It hands every result
    to the UI through ``deliver``, which it calls from the worker thread, so
    ``deliver`` must be thread-safe (the terminal passes a function that uses
    ``loop.call_soon_threadsafe``).

    `start`, `submit`, `is_connected` and `stop` are called from the UI thread.

Outbox
    A message (`Outgoing`) is sent at once when the server is connected. While it
    is not, messages wait in order in the outbox and are sent as soon as ZEO has
    reconnected; the UI shows them as pending until a `Landed` or `NotSent` event
    names them. A message is given up (`NotSent`) when its commit fails for good
    (`RetryLimitExceeded` after the client's retry policy, or any other error), when
    the server has not come back within ``give_up_after`` seconds, or when the
    worker stops with it still waiting. Commands that read (``/who``, ``/rooms``,
    ``/history``, ``/join``) are refused at once while the server is away instead
    of hanging; when connected, the outbox is sent first so order is kept.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .client import ChatClient, NotAMember
from .commands import Create, Invite, Join, Kick, Members, Msg, Query, Rooms, Who
from .display import plural
from .errors import RetryLimitExceeded
from .message import Message, MessageKind
from .sanitize import clean

__all__ = [
    "ClientWorker",
    "Outgoing",
    "Earlier",
    "Request",
    "Event",
    "Joined",
    "Arrived",
    "Landed",
    "NotSent",
    "EarlierPage",
    "Notice",
    "Problem",
    "HISTORY_PAGE",
]

log = logging.getLogger(__name__)

HISTORY_PAGE = 50


# -- requests: UI thread -> worker ---------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """A message to post; ``id`` is the UI's handle on it while it is pending."""

    id: int
    text: str
    kind: MessageKind = "say"


@dataclass(frozen=True)
class Earlier:
    """Fetch the ``count`` messages before ``before`` in the current room."""

    count: int
    before: Message


Request = (
    Outgoing | Earlier | Join | Rooms | Who | Create | Invite | Kick | Members | Msg | Query
)


# -- events: worker -> UI thread -----------------------------------------------


@dataclass(frozen=True)
class Joined:
    """Now in ``room``; ``page`` is its latest history, oldest first. ``shown`` is
    how the room is named on screen (``#plans (private)``, ``@bob``)."""

    room: str
    page: tuple[Message, ...]
    shown: str = field(default="", compare=False)


@dataclass(frozen=True)
class Arrived:
    """New messages in the current room, oldest first."""

    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Landed:
    """Outgoing message ``id`` is stored, as the message whose id is ``stored``;
    ``messages`` are what arrived up to it."""

    id: int
    messages: tuple[Message, ...]
    stored: str | None = None


@dataclass(frozen=True)
class NotSent:
    """Outgoing message ``id`` was given up; ``reason`` says why, in one line."""

    id: int
    reason: str


@dataclass(frozen=True)
class EarlierPage:
    """The answer to `Earlier`: the messages before ``before``, oldest first."""

    before: Message
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Notice:
    """Lines of information (``/who``, ``/rooms``)."""

    lines: tuple[str, ...]


@dataclass(frozen=True)
class Problem:
    """A request failed; ``text`` says why, in one line."""

    text: str


Event = Joined | Arrived | Landed | NotSent | EarlierPage | Notice | Problem


class ClientWorker:
    """Runs a `ChatClient` in its own thread; see the module docstring."""

    def __init__(
        self,
        open_client: Callable[[], ChatClient],
        room: str,
        deliver: Callable[[Event], None],
        *,
        heartbeat_every: float = 20.0,
        give_up_after: float = 120.0,
        poll: float = 0.25,
        away_poll_max: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open_client = open_client
        self._room = room
        self._deliver = deliver
        self._heartbeat_every = heartbeat_every
        self._give_up_after = give_up_after
        self._poll = poll
        self._away_poll_max = away_poll_max
        self._clock = clock
        self._requests: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._outbox: deque[tuple[Outgoing, float]] = deque()
        self._stopping = threading.Event()
        self._ready: concurrent.futures.Future[Joined] = concurrent.futures.Future()
        self._client: ChatClient | None = None
        self._thread = threading.Thread(target=self._run, name="chatzeo-client", daemon=True)

    # -- UI thread ---------------------------------------------------------------

    def start(self) -> concurrent.futures.Future[Joined]:
        """Start the thread; the future gives the first `Joined` (the room's latest
        page), or the error that prevented connecting or joining."""
        self._thread.start()
        return self._ready

    def submit(self, request: Request) -> None:
        """Queue a request for the worker and wake it."""
        self._requests.put(request)
        if self._client is not None:
            self._client.wake()

    def is_connected(self) -> bool:
        """Whether ZEO is connected to the server now: reads a flag that ZEO's IO
        thread keeps, so it is safe and free from any thread."""
        client = self._client
        return client is not None and client.is_connected()

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the worker to close the client (counting the connection out) and wait
        up to ``timeout`` seconds; True if it finished."""
        self._stopping.set()
        if self._client is not None:
            self._client.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- worker thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            client = self._open_client()
        except BaseException as error:
            self._ready.set_exception(error)
            return
        try:
            page = client.join(self._room, history=HISTORY_PAGE)
            assert client.room is not None
            self._client = client
            self._ready.set_result(_joined(client, page))
            self._tell_about_other_connections(client)
        except BaseException as error:
            client.close()
            self._ready.set_exception(error)
            return
        try:
            self._serve(client)
        except Exception:  # the UI must hear that its messages will not go out
            log.exception("chat worker failed")
            self._deliver(Problem("the connection thread failed; restart the chat"))
        finally:
            while self._outbox:
                outgoing, _ = self._outbox.popleft()
                self._deliver(NotSent(outgoing.id, "the chat closed before it was sent"))
            client.close()

    def _tell_about_other_connections(self, client: ChatClient) -> None:
        try:
            others = client.other_connections()
        except Exception:  # only a courtesy: never a reason not to chat
            log.info("counting other connections failed", exc_info=True)
            return
        if others:
            name = client.user
            where = "another connection" if others == 1 else f"{others} other connections"
            self._deliver(Notice((
                f"the name {name} is also in use by {where} right now: another terminal "
                "of yours, or someone else (without TLS client certificates a name "
                "proves nothing); only what you send here is marked as yours",
            )))

    def _serve(self, client: ChatClient) -> None:
        next_beat = self._clock() + self._heartbeat_every
        was_connected = True
        behind = False  # the room changed and we have not read it yet
        away_wait = self._poll  # grows while the server stays away
        while not self._stopping.is_set():
            if was_connected:
                away_wait = self._poll
                timeout = max(0.0, next_beat - self._clock())
                if behind:
                    timeout = min(timeout, self._poll)
            else:
                # No heartbeat can go out now, so a beat that fell due must not make
                # the wait zero (that spun a core for the whole outage). ZEO's
                # reconnection fires the feed (invalidateCache), which ends this wait
                # at once; the timeout only bounds how late a lost wake-up is seen.
                timeout = away_wait
                away_wait = min(away_wait * 2, self._away_poll_max)
            behind = client.wait(timeout) or behind
            if self._stopping.is_set():
                self._send_before_stopping(client)
                return
            connected = client.is_connected()
            if connected and not was_connected:
                # A lease may have lapsed during the outage, and what was committed
                # meanwhile must be read even if no invalidation named our room.
                behind = True
                next_beat = self._clock()
            self._handle_requests(client, connected)
            if connected:
                self._flush(client)
                if behind:
                    behind = not self._receive(client)
                if self._clock() >= next_beat and client.is_connected():
                    next_beat = self._clock() + self._beat(client)
            else:
                self._expire()
            was_connected = connected

    def _send_before_stopping(self, client: ChatClient) -> None:
        """What the user typed before leaving (a ``/quit`` message too) goes out if
        the server is there; requests to read are dropped, nobody awaits them."""
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                break
            if isinstance(request, Outgoing):
                self._outbox.append((request, self._clock()))
        if client.is_connected():
            self._flush(client)

    def _handle_requests(self, client: ChatClient, connected: bool) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            if isinstance(request, Outgoing):
                self._outbox.append((request, self._clock()))
            elif not connected:
                self._deliver(Problem("the server is away; try again once it is back"))
            else:
                self._flush(client)
                self._answer(client, request)

    def _answer(self, client: ChatClient, request: Request) -> None:
        try:
            if isinstance(request, Join | Create | Query):
                self._receive(client)  # show what arrived in the room being left
                if isinstance(request, Join):
                    page = client.join(request.room, history=HISTORY_PAGE)
                elif isinstance(request, Create):
                    page = client.create_private(request.room, history=HISTORY_PAGE)
                else:
                    page = client.query(request.user, history=HISTORY_PAGE)
                self._deliver(_joined(client, page))
            elif isinstance(request, Invite | Kick):
                done = (client.invite if isinstance(request, Invite) else client.kick)(
                    request.user)
                verb = "invited" if isinstance(request, Invite) else "removed"
                if not done:
                    verb = "already a member:" if isinstance(request, Invite) else "not a member:"
                self._deliver(Notice((f"{verb} {request.user}",)))
            elif isinstance(request, Members):
                owner, members = client.members()
                shown = ", ".join(f"{name} (owner)" if name == owner else name
                                  for name in members)
                self._deliver(Notice((f"members: {shown}",)))
            elif isinstance(request, Msg):
                client.send_direct(request.user, request.text)
                self._deliver(Notice((f"-> {request.user}: {request.text}",
                                      f"(/query {request.user} to read the conversation)")))
            elif isinstance(request, Earlier):
                older = client.history(request.count, before=request.before)
                self._deliver(EarlierPage(request.before, tuple(older)))
            elif isinstance(request, Who):
                assert client.room is not None
                names = client.who()
                shown = ", ".join(names) if names else "nobody"
                where = client.shown_room() if client.private else f"#{client.room.name}"
                self._deliver(Notice((f"in {where}: {shown}",)))
            else:
                rooms = client.rooms()
                # Private rooms come named already (#plans (private), @bob).
                lines = [f"{'' if name[:1] in '#@' else '#'}{clean(name)}: "
                         f"{plural(count, 'message')}" for name, count in rooms]
                self._deliver(Notice(tuple(lines) or ("no rooms yet",)))
        except Exception as error:
            log.info("request %r failed", request, exc_info=True)
            self._deliver(Problem(_one_line(error)))

    def _flush(self, client: ChatClient) -> None:
        """Send the outbox, in order, while the server is connected."""
        while self._outbox and client.is_connected():
            outgoing, _ = self._outbox[0]
            try:
                stored = client.send(outgoing.text, outgoing.kind)
            except RetryLimitExceeded as error:
                self._outbox.popleft()
                self._deliver(NotSent(outgoing.id, f"gave up after {error.seconds:.0f}s"))
                continue
            except Exception as error:
                log.info("sending failed", exc_info=True)
                self._outbox.popleft()
                self._deliver(NotSent(outgoing.id, _one_line(error)))
                continue
            self._outbox.popleft()
            messages = self._read(client)
            self._deliver(Landed(outgoing.id, tuple(messages or ()), stored.id))

    def _expire(self) -> None:
        """Give up the messages that have waited too long for the server."""
        limit = self._clock() - self._give_up_after
        while self._outbox and self._outbox[0][1] <= limit:
            outgoing, _ = self._outbox.popleft()
            reason = f"the server did not come back within {self._give_up_after:g}s"
            self._deliver(NotSent(outgoing.id, reason))

    def _receive(self, client: ChatClient) -> bool:
        """Deliver what is new in the room; False if it could not be read."""
        messages = self._read(client)
        if messages:
            self._deliver(Arrived(tuple(messages)))
        return messages is not None

    def _read(self, client: ChatClient) -> list[Message] | None:
        try:
            return client.receive()
        except NotAMember as error:
            # Removed from the private room: say so once, and go back to the lobby.
            self._deliver(Problem(str(error)))
            try:
                page = client.join("lobby", history=HISTORY_PAGE)
                self._deliver(_joined(client, page))
            except Exception as failure:
                self._deliver(Problem(_one_line(failure)))
            return []
        except Exception:  # the server went away mid-read; read again once back
            log.info("reading the room failed", exc_info=True)
            return None

    def _beat(self, client: ChatClient) -> float:
        """Renew the presence lease; seconds until the next renewal."""
        try:
            client.heartbeat()
        except Exception:
            log.info("heartbeat failed", exc_info=True)
            return min(self._heartbeat_every, 5.0)
        return self._heartbeat_every


def _joined(client: ChatClient, page: list[Message]) -> Joined:
    assert client.room is not None
    return Joined(client.room.name, tuple(page), client.shown_room())


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."

