"""`ClientWorker`: the one thread that owns the terminal client's `ChatClient`.

A ZODB connection belongs to one thread, and the terminal's UI thread must never
block on the network, so every call on the `ChatClient` (creating it, joining,
sending, receiving, heartbeats, closing) happens in this worker thread.

Threads
    The worker thread runs `ClientWorker._run`. It sleeps on its own wake-up event,
    which the client's `ChangeFeed` sets as soon as ZEO pushes a commit to a watched
    room and `submit`/`stop` set for the UI, or until the timeout; then the feed
    says (without waiting) whether a room changed, so a request is answered without
    reading the rooms as if a commit had come. The timeout is the next heartbeat,
    or while the server is away a poll of the *local* connection flag (no request
    to the server) that backs off from ``poll`` to ``away_poll_max`` seconds; ZEO's
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

from ..client import CatchUp, ChatClient
from ..errors import RetryLimitExceeded
from ..message import Message
from .commands import (
    Create,
    Invite,
    Join,
    Kick,
    Members,
    Mentions,
    Msg,
    Part,
    Query,
    Switch,
    Topic,
    Who,
)
from .display import plural, room_label
from .events import (
    Activity,
    Arrived,
    ConnectionChanged,
    Earlier,
    EarlierPage,
    Event,
    Joined,
    Landed,
    MentionList,
    Notice,
    NotSent,
    Outgoing,
    Parted,
    PresenceChanged,
    Problem,
    Request,
    TopicChanged,
)
from .sanitize import clean

__all__ = ["ClientWorker", "HISTORY_PAGE", "CATCH_UP"]

log = logging.getLogger(__name__)

HISTORY_PAGE = 50
# At most this many of the messages that came while one was away are shown on
# returning; the line above them says how many there were.
CATCH_UP = 200
# Switching to a room with nothing new shows its last few messages for context.
SWITCH_CONTEXT = 10


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
        # The worker's own wake-up: set by `submit`/`stop` (the UI) and by the
        # client's commit feed; after it, the feed itself says whether a room changed,
        # so a request never looks like a commit.
        self._wake = threading.Event()
        self._ready: concurrent.futures.Future[Joined] = concurrent.futures.Future()
        self._client: ChatClient | None = None
        self._present: dict[str, frozenset[str]] = {}
        self._topics: dict[str, tuple[str, str, float] | None] = {}
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
        self._wake.set()

    def is_connected(self) -> bool:
        """Whether ZEO is connected to the server now: reads a flag that ZEO's IO
        thread keeps, so it is safe and free from any thread."""
        client = self._client
        return client is not None and client.is_connected()

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the worker to close the client (counting the connection out) and wait
        up to ``timeout`` seconds; True if it finished."""
        self._stopping.set()
        self._wake.set()
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
            # The rooms joined before are reopened; the one asked for is current.
            # (in the order joined, so Alt-N names the same room each day).
            for name in client.joined_rooms():
                client.join(name, history=0, remember=True)
            joined = self._open(client, self._room, switched=False)
            client.feed.also_notify(self._wake.set)
            self._wake.set()  # what the feed heard while joining is read at once
            self._client = client
            self._ready.set_result(joined)
            self._snapshot(client)
            known = tuple(name for name, _ in client.rooms() if name[:1] not in "#@")
            self._deliver(Activity(tuple(client.background_unread()), known))
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

    def _open(self, client: ChatClient, name: str, *, switched: bool) -> Joined:
        """Join (or switch to) ``name`` and say what the user missed there."""
        if switched:
            client.flush_marks(force=True)  # where the user stopped in the room left
            client.switch(name)
            page: list[Message] = []
        else:
            page = client.join(name, history=HISTORY_PAGE, remember=True)
        return self._now_in(client, page, switched=switched)

    def _now_in(self, client: ChatClient, page: list[Message], *, switched: bool) -> Joined:
        """The `Joined` for the current room, just opened (``page`` its latest
        messages) or switched to."""
        key = client.current
        assert key is not None
        caught: CatchUp = client.catch_up(key, CATCH_UP)
        if caught.unread or caught.lost:
            page = list(caught.messages)
        elif switched:
            page = client.history(SWITCH_CONTEXT)
        if page:
            client.mark_read(key, page[-1].key)
        return Joined(
            key, tuple(page), caught.unread, caught.lost, client.topic(key),
            switched, tuple(client.open_rooms), client.shown_room(),
        )

    def _snapshot(self, client: ChatClient) -> None:
        """Remember who is present and each topic, to tell changes from now on."""
        self._present = client.presence()
        self._topics = {name: client.topic(name) for name in client.open_rooms}

    def _watch_rooms(self, client: ChatClient) -> None:
        """Tell the UI who came and went, and which topics changed, since last time."""
        try:
            present = client.presence()
            topics = {name: client.topic(name) for name in client.open_rooms}
        except Exception:  # the server went away mid-read; the next wake tries again
            log.info("reading presence failed", exc_info=True)
            return
        quitters: set[str] = set()
        for name, now in present.items():
            before = self._present.get(name)
            if before is None or before == now:
                continue
            gone = sorted(before - now)
            online = {user for user in gone if _still_online(client, user)}
            quitters.update(user for user in gone if user not in online)
            self._deliver(PresenceChanged(
                name,
                came=tuple(sorted(now - before)),
                parted=tuple(user for user in gone if user in online),
                present=tuple(sorted(now)),
            ))
        if quitters:  # about the person, not a room: said once, wherever one is
            self._deliver(PresenceChanged("", quit=tuple(sorted(quitters))))
        for name, topic in topics.items():
            if name in self._topics and self._topics[name] != topic:
                self._deliver(TopicChanged(name, topic))
        self._present, self._topics = present, topics

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
                due = client.marks_due_in()
                if due is not None:  # a read marker waits to be written
                    timeout = min(timeout, max(due, self._poll))
            else:
                # No heartbeat can go out now, so a beat that fell due must not make
                # the wait zero (that spun a core for the whole outage). ZEO's
                # reconnection fires the feed (invalidateCache), which ends this wait
                # at once; the timeout only bounds how late a lost wake-up is seen.
                timeout = away_wait
                away_wait = min(away_wait * 2, self._away_poll_max)
            self._wake.wait(timeout)
            self._wake.clear()
            behind = client.wait(0) or behind  # a commit, not a request, woke it
            if self._stopping.is_set():
                self._send_before_stopping(client)
                return
            connected = client.is_connected()
            if connected != was_connected:
                self._deliver(ConnectionChanged(connected))
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
                    self._watch_rooms(client)
                if self._clock() >= next_beat and client.is_connected():
                    next_beat = self._clock() + self._beat(client)
                    self._watch_rooms(client)  # leases that ran out are gone now
                self._write_marks(client)
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
            if isinstance(request, Join | Switch):
                self._receive(client)  # show what arrived in the room being left
                opened = _match(client, request.room)
                if isinstance(request, Switch) and opened is None:
                    shown = ", ".join(room_label(name) for name in client.open_rooms)
                    self._deliver(Problem(f"{room_label(request.room)} is not open "
                                          f"(open: {shown}); /join opens it"))
                    return
                name = opened or request.room
                self._deliver(self._open(client, name, switched=opened is not None))
                self._snapshot(client)
            elif isinstance(request, Create | Query):
                self._receive(client)
                if isinstance(request, Create):
                    page = client.create_private(request.room, history=HISTORY_PAGE)
                else:
                    page = client.query(request.user, history=HISTORY_PAGE)
                self._deliver(self._now_in(client, page, switched=False))
                self._snapshot(client)
            elif isinstance(request, Part):
                name = request.room or client.current or ""
                match = _match(client, name)
                if match is None:
                    self._deliver(Problem(f"{room_label(name)} is not open"))
                    return
                if len(client.open_rooms) == 1:
                    self._deliver(Problem("this is your last open room; /quit leaves the chat"))
                    return
                was_current = client.current == match
                client.part(match)
                self._deliver(Parted(match, tuple(client.open_rooms)))
                if was_current and client.current is not None:
                    self._deliver(self._open(client, client.current, switched=True))
                self._snapshot(client)
            elif isinstance(request, Topic):
                current = client.current
                assert current is not None
                if request.text is not None:
                    client.set_topic(request.text)
                    self._topics[current] = client.topic()
                self._deliver(TopicChanged(current, client.topic()))
            elif isinstance(request, Mentions):
                self._deliver(MentionList(tuple(client.mentions())))
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
                names = client.who()
                shown = ", ".join(names) if names else "nobody"
                where = client.shown_room()
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
                # Read back once: by the receive below, which brings it with its
                # final key and whatever landed before it.
                stored = client.send(outgoing.text, outgoing.kind, read_back=False)
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
            # Our own commit fired the feed; the read below covers every open room,
            # so that notice is taken here instead of causing a second read.
            client.wait(0)
            messages = self._read_after_send(client)
            if messages and client.current is not None:
                client.mark_read(client.current, messages[-1].key)
            self._deliver(Landed(outgoing.id, tuple(messages or ()), stored.id))

    def _expire(self) -> None:
        """Give up the messages that have waited too long for the server."""
        limit = self._clock() - self._give_up_after
        while self._outbox and self._outbox[0][1] <= limit:
            outgoing, _ = self._outbox.popleft()
            reason = f"the server did not come back within {self._give_up_after:g}s"
            self._deliver(NotSent(outgoing.id, reason))

    def _receive(self, client: ChatClient) -> bool:
        """Deliver what is new in every open room; False if it could not be read.
        What the current room shows counts as read (`ChatClient.mark_read`)."""
        try:
            found = client.receive_all()
        except Exception:  # the server went away mid-read; read again once back
            log.info("reading the rooms failed", exc_info=True)
            return False
        for name, was_current in client.take_removed():
            self._removed(client, name, f"you are no longer a member of {name}", was_current)
        messages = [message for batch in found.values() for message in batch]
        if messages:
            current = client.current
            if current in found:
                client.mark_read(current, found[current][-1].key)
            self._deliver(Arrived(tuple(messages)))
        return True

    def _write_marks(self, client: ChatClient) -> None:
        """Write read markers if due (at most every `chatzeo.client.MARK_EVERY` s)."""
        try:
            client.flush_marks()
        except Exception:  # kept in memory; the next attempt writes them
            log.info("writing read markers failed", exc_info=True)

    def _read_after_send(self, client: ChatClient) -> list[Message]:
        """What is new in every open room, once, after a send: the current room's
        is returned (it ends with the message sent), the others' delivered as
        `Arrived`. If the read fails the feed is fired, so the next wake reads."""
        try:
            found = client.receive_all()
        except Exception:  # the server went away mid-read; read again once back
            log.info("reading the rooms failed", exc_info=True)
            client.wake()
            return []
        current = client.current
        for name, was_current in client.take_removed():
            self._removed(client, name, f"you are no longer a member of {name}", was_current)
        others = [message for name, batch in found.items() if name != current
                  for message in batch]
        if others:
            self._deliver(Arrived(tuple(others)))
        return found.get(current, []) if current is not None else []

    def _removed(self, client: ChatClient, name: str, reason: str, was_current: bool) -> None:
        """The client closed the private room ``name``: this user was removed from
        it. Say so once and, if it was current, show the room now current (the
        lobby if none is open)."""
        self._deliver(Problem(reason))
        self._deliver(Parted(name, tuple(client.open_rooms)))
        if not was_current:
            return
        try:
            if client.current is not None:
                self._deliver(self._open(client, client.current, switched=True))
            else:
                self._deliver(self._open(client, "lobby", switched=False))
            self._snapshot(client)
        except Exception as failure:
            self._deliver(Problem(_one_line(failure)))

    def _beat(self, client: ChatClient) -> float:
        """Renew the presence lease; seconds until the next renewal."""
        try:
            client.heartbeat()
        except Exception:
            log.info("heartbeat failed", exc_info=True)
            return min(self._heartbeat_every, 5.0)
        return self._heartbeat_every


def _still_online(client: ChatClient, user: str) -> bool:
    try:
        return client.online(user)
    except Exception:
        return True  # unknown: say "left" rather than claim they quit


def _match(client: ChatClient, wanted: str) -> str | None:
    """The open room ``wanted`` names: its exact key, else a public room's name or a
    private room's label (``plans``, ``#plans (private)``, ``@bob``) regardless of
    case, public ones first."""
    if wanted in client.open_rooms:
        return wanted
    folded = wanted.casefold().removeprefix("#")
    public = [name for name in client.open_rooms if not client.is_private(name)]
    private = [name for name in client.open_rooms if client.is_private(name)]
    for name in public:
        if name.casefold() == folded:
            return name
    for name in private:
        plain = name.casefold().removeprefix("#").removesuffix(" (private)")
        if folded in (name.casefold(), plain):
            return name
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."

