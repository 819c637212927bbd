"""What a line typed into `chatzeo chat` means: a message, an action or a slash command.

`parse` turns one line into a command object, validating it completely first, so a
line that would be refused (unknown command, bad room name, message too long or
holding control characters) is reported before anything is queued or sent.

Pure functions and frozen dataclasses, no I/O: the terminal's UI thread calls
`parse`, and the command objects may then cross to the worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidCommand
from ..message import MessageKind
from ..validation import check_room_name, check_topic, check_user_name, checked_text

__all__ = [
    "Command",
    "Say",
    "Join",
    "Rooms",
    "Who",
    "History",
    "Help",
    "Quit",
    "Switch",
    "Part",
    "Topic",
    "Mentions",
    "Bell",
    "COMMAND_NAMES",
    "ROOM_COMMANDS",
    "Create",
    "Invite",
    "Kick",
    "Members",
    "Msg",
    "Query",
    "InvalidCommand",
    "parse",
    "HELP",
    "MAX_HISTORY",
]

# A page bigger than this is more than a terminal's scrollback shows anyway.
MAX_HISTORY = 1000


@dataclass(frozen=True)
class Say:
    """Post ``text`` to the current room (``kind="action"`` for ``/me``)."""

    text: str
    kind: MessageKind = "say"


@dataclass(frozen=True)
class Join:
    """Leave the current room for ``room`` (created if missing)."""

    room: str


@dataclass(frozen=True)
class Rooms:
    """List the rooms and their message counts."""


@dataclass(frozen=True)
class Who:
    """List the users present in the current room."""


@dataclass(frozen=True)
class History:
    """Show the ``count`` messages before the oldest one shown."""

    count: int


@dataclass(frozen=True)
class Create:
    """Create the invite-only room ``room``, owned by this user, and enter it."""

    room: str


@dataclass(frozen=True)
class Invite:
    """Let ``user`` into the current private room (its owner only)."""

    user: str


@dataclass(frozen=True)
class Kick:
    """Remove ``user`` from the current private room (its owner only)."""

    user: str


@dataclass(frozen=True)
class Members:
    """List the current private room's owner and members."""


@dataclass(frozen=True)
class Msg:
    """Post ``text`` to the direct conversation with ``user``, staying here."""

    user: str
    text: str


@dataclass(frozen=True)
class Query:
    """Enter the direct conversation with ``user``."""

    user: str


@dataclass(frozen=True)
class Help:
    """Show the commands."""


@dataclass(frozen=True)
class Quit:
    """Leave the chat, first posting ``message`` if there is one (IRC's quit message)."""

    message: str = ""


@dataclass(frozen=True)
class Switch:
    """Make the open room ``room`` the current one (keys do it too: Alt-1..9, Ctrl-N/P)."""

    room: str


@dataclass(frozen=True)
class Part:
    """Leave ``room`` (the current one if None): no longer open, nor rejoined at start."""

    room: str | None = None


@dataclass(frozen=True)
class Topic:
    """Show the current room's topic (``text`` None) or set it (``""`` clears it)."""

    text: str | None = None


@dataclass(frozen=True)
class Mentions:
    """List the latest messages that mention you, across your rooms."""


@dataclass(frozen=True)
class Bell:
    """Turn the bell on a mention on or off (``on`` None: say which it is)."""

    on: bool | None = None


Command = (
    Say | Join | Rooms | Who | History | Help | Quit | Switch | Part | Topic | Mentions | Bell
    | Create | Invite | Kick | Members | Msg | Query
)

# For completion: every command's name, and those whose argument is a room.
COMMAND_NAMES = (
    "bell", "create", "help", "history", "invite", "join", "kick", "me", "members", "mentions",
    "msg", "part", "query", "quit", "rooms", "switch", "topic", "who",
)
ROOM_COMMANDS = ("join", "part", "switch")

HELP = """\
Type a message and press Enter to send it. Commands:
  /join ROOM    open ROOM too and switch to it (created if it does not exist; Dev
                finds dev); the rooms you join are reopened at your next start
  /switch ROOM  switch to an open room (Alt-1..9 by number, Ctrl-N/Ctrl-P next/previous)
  /part [ROOM]  leave this room (or ROOM): closed here and not reopened at start
  /topic [TEXT] show this room's topic, or set it (anyone may; shown with who set it);
                /topic -delete clears it
  /mentions     the latest messages that mention you (@name, or name: first), all rooms
  /bell on|off  ring the terminal's bell when someone mentions you (on by default)
  /rooms        list the rooms and how many messages each holds
  /who          who is in this room now
  /me ACTION    say what you do, e.g. /me waves
  /history N    show the N messages before the oldest one shown
  /create ROOM  make an invite-only room you own (needs a TLS server)
  /invite USER  let USER into this private room (its owner only)
  /kick USER    remove USER from this private room (its owner only)
  /members      who may read this private room
  /msg USER TEXT  send USER a direct message; /query USER opens the conversation
  /help         this text
  /quit [TEXT]  leave, posting TEXT first if given (Ctrl-D or Ctrl-C on an empty line too)
Ctrl-C clears the line being typed; Alt-Enter starts a new line of the same message
(pasted lines stay one message too); Tab completes names, commands and rooms. The
status bar lists the other rooms with unread messages: 2:dev(3) has 3, 2:dev(3,@1) one
mentions you. Start a message with // to send it with a single leading /."""


def parse(line: str) -> Command | None:
    """The command ``line`` asks for, or None for a blank line.

    Raises `InvalidCommand` for an unknown command or a bad argument and
    `InvalidMessage` for text that may not be posted; both are `InvalidInput`s
    with a one-line message meant for the user.
    """
    if not line.strip():
        return None
    if line.startswith("//"):
        return Say(checked_text(line[1:]))
    if not line.startswith("/"):
        return Say(checked_text(line))
    name, _, rest = line[1:].partition(" ")
    argument = rest.strip()
    name = name.lower()
    if name == "me":
        if not argument:
            raise InvalidCommand("/me needs an action, e.g. /me waves")
        return Say(checked_text(argument), "action")
    if name == "join":
        if not argument or " " in argument:
            raise InvalidCommand("/join needs one room name, e.g. /join lobby")
        return Join(check_room_name(argument))
    if name == "history":
        return History(_count(argument))
    if name in ("switch", "part"):
        if " " in argument or (name == "switch" and not argument):
            raise InvalidCommand(f"/{name} needs one room name, e.g. /{name} lobby")
        if argument.startswith("@"):  # a direct conversation, by its label
            room: str | None = "@" + check_user_name(argument[1:])
        else:
            room = check_room_name(argument) if argument else None
        if name == "part":
            return Part(room)
        assert room is not None
        return Switch(room)
    if name == "topic":
        if argument == "-delete":  # as in weechat and irssi
            return Topic("")
        return Topic(check_topic(argument) if argument else None)
    if name == "bell":
        if argument.lower() not in ("", "on", "off"):
            raise InvalidCommand("/bell takes on or off")
        return Bell({"on": True, "off": False}.get(argument.lower()))
    if name == "mentions":
        if argument:
            raise InvalidCommand("/mentions takes no argument")
        return Mentions()
    if name == "create":
        if not argument or " " in argument:
            raise InvalidCommand("/create needs one room name, e.g. /create plans")
        return Create(check_room_name(argument))
    if name in ("invite", "kick", "query"):
        if not argument or " " in argument:
            raise InvalidCommand(f"/{name} needs one user name, e.g. /{name} bob")
        user = check_user_name(argument.removeprefix("@"))
        if name == "invite":
            return Invite(user)
        return Kick(user) if name == "kick" else Query(user)
    if name == "msg":
        user, _, text = argument.partition(" ")
        if not user or not text.strip():
            raise InvalidCommand("/msg needs a user and a message, e.g. /msg bob hello")
        return Msg(check_user_name(user.removeprefix("@")), checked_text(text))
    if name == "quit":
        return Quit(checked_text(argument) if argument else "")
    simple: dict[str, Command] = {
        "rooms": Rooms(), "who": Who(), "help": Help(), "members": Members(),
    }
    if name in simple:
        if argument:
            raise InvalidCommand(f"/{name} takes no argument")
        return simple[name]
    shown = name if len(name) <= 20 else name[:20] + "..."
    raise InvalidCommand(f"unknown command /{shown}; /help lists the commands")


def _count(argument: str) -> int:
    if not argument:
        raise InvalidCommand("/history needs a number, e.g. /history 20")
    try:
        count = int(argument)
    except ValueError:
        raise InvalidCommand(
            f"/history needs a whole number, not {argument[:20]!r}"
        ) from None
    if not 1 <= count <= MAX_HISTORY:
        raise InvalidCommand(f"/history takes a number from 1 to {MAX_HISTORY}")
    return count
