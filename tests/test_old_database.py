"""A database written by chatzeo before its server/terminal layout still opens,
reads and accepts posts, directly and through a real guarded `chatzeo serve`.

``tests/data/stop18.fs`` was written by commit d36c18d's code
(``tests/data/write_stop18_database.py`` says how) and is never rewritten: each test
works on a copy. It holds every class chatzeo pickles (`ChatSession`, `RoomClock`,
`ChatRoot`, `User`, `ReadMarkers`, `PrivateRoom`), under the class paths of that
time; a rename of any of them, or a change of what they store without a compatible
default, fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO
from ZODB.FileStorage import FileStorage

from chatzeo import ChatClient, open_db
from chatzeo.errors import NoSuchRoom
from chatzeo.markers import ReadMarkers
from chatzeo.privacy import PrivateRoom
from chatzeo.realm import ChatRoot, User, get_root
from chatzeo.session import ChatSession, RoomClock
from chatzeo.testing import ServerProcess, chatzeo_command
from chatzeo.tls import load_identity

pytestmark = pytest.mark.timeout(180)

OLD = Path(__file__).parent / "data" / "stop18.fs"
LOBBY = [f"lobby message {n}" for n in range(150)]
# Every class a chatzeo database pickles, by the module path its records name.
STORED = {
    "chatzeo.session": ("ChatSession", "RoomClock"),
    "chatzeo.realm": ("ChatRoot", "User"),
    "chatzeo.markers": ("ReadMarkers",),
    "chatzeo.privacy": ("PrivateRoom",),
}


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    copy = tmp_path / "data" / "chat.fs"
    copy.parent.mkdir()
    shutil.copyfile(OLD, copy)
    return copy


def test_the_old_file_holds_every_stored_class_under_its_old_path() -> None:
    """The fixture is what this module claims: read raw, without chatzeo's loader."""
    storage = FileStorage(str(OLD), read_only=True)
    try:
        raw = b"".join(data.data or b"" for record in storage.iterator() for data in record)
    finally:
        storage.close()
    for module, names in STORED.items():
        for name in names:
            # A record's class pickle (and a reference to it) names module and class
            # with pickle's GLOBAL opcode.
            assert f"c{module}\n{name}\n".encode() in raw, f"{module}.{name}"


def test_an_old_file_opens_reads_and_accepts_posts(old_file: Path) -> None:
    db = open_db(f"file://{old_file}")
    try:
        carol = ChatClient(db, "carol")
        try:
            history = carol.join("lobby", history=500)
            assert [m.text for m in history] == LOBBY
            keys = [m.key for m in history]
            assert keys == sorted(keys) and len(set(keys)) == len(keys)
            assert carol.join("dev", history=10)[-1].kind == "action"
            carol.join("lobby", history=0)
            later = carol.send("after the old history")
            assert later.key > keys[-1]
        finally:
            carol.close()

        connection = db.open()
        try:
            root = get_root(connection)
            assert isinstance(root, ChatRoot)
            lobby = root.rooms["lobby"]
            assert isinstance(lobby, ChatSession) and isinstance(lobby._clock, RoomClock)
            texts = [m.text for m in lobby.messages_after(0, limit=1000)]
            assert texts == [*LOBBY, "after the old history"]
            assert root.rooms["dev"].topic[0] == "releases and reviews"
            bob = root.users["bob"]
            assert isinstance(bob, User) and isinstance(bob.markers, ReadMarkers)
            assert bob.markers.get("lobby") > 0
            rooms = sorted((room.kind, room.name) for room in root.private.values())
            assert rooms == [("dm", "dm"), ("room", "plans")]
            assert all(isinstance(room, PrivateRoom) for room in root.private.values())
        finally:
            connection.close()
    finally:
        db.close()


def test_check_passes_on_an_old_file(old_file: Path) -> None:
    done = subprocess.run(chatzeo_command("check", str(old_file)), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def served(old_file: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, dict[str, Path]]]:
    # The file has private rooms, so it may only be served with certificates.
    server = ServerProcess(old_file.parent, options=("--tls", "auto")).start()
    try:
        identities = {}
        for name in ("alice", "bob"):
            out = tmp_path / f"{name}.chatzeo"
            done = subprocess.run(
                chatzeo_command("invite", name, "--config", str(REPO / "zeo.conf"),
                                "--data-dir", str(server.data_dir), "--server",
                                server.address, "--out", str(out)),
                capture_output=True, text=True, timeout=60, cwd=REPO, env=dict(os.environ))
            assert done.returncode == 0, done.stderr
            identities[name] = out
        yield server, identities
    finally:
        server.stop()


def test_a_guarded_server_serves_an_old_file(
    served: tuple[ServerProcess, dict[str, Path]],
) -> None:
    """The guard and the read guard index the old records and accept honest posts
    to them: to an old public room, an old private room and an old conversation."""
    _server, identities = served
    clients = []
    try:
        for name in ("alice", "bob"):
            identity = load_identity(identities[name])
            clients.append(ChatClient(open_db(identity.server, ssl=identity.context, wait=15),
                                      identity.name))
        alice, bob = clients
        assert [m.text for m in alice.join("lobby", history=500)] == LOBBY
        alice.send("alice, served today")
        assert [m.text for m in bob.join("lobby", history=1)] == ["alice, served today"]
        assert [m.text for m in alice.join("plans", history=10)] == ["a private plan"]
        alice.send("a plan made today")
        assert [m.text for m in bob.join("@alice", history=10)] == ["a direct word"]
        bob.send("a direct answer")
        assert [m.text for m in alice.join("@bob", history=10)] == [
            "a direct word", "a direct answer"]
        # bob is no member of the old private room: the read guard still says so.
        with pytest.raises(NoSuchRoom):
            bob.join("plans", history=1, create=False)
    finally:
        for client in clients:
            client.close()
            client.db.close()
