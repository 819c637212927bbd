"""The private-room rules and the read index without a server: fast unit tests.

`chatzeo.privacy.access_problem` (who may create and change a `PrivateRoom`),
`chatzeo.server.readguard.ReadIndex` over a real FileStorage written by chatzeo's own
classes (what belongs to a room, and that a commit can claim only new objects),
and `chatzeo.server.identity` (issue, save, revoke, load) on a throwaway CA.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from chatzeo.errors import IdentityError, InvalidInput
from chatzeo.privacy import PrivateRoom, access_problem
from chatzeo.realm import get_root
from chatzeo.server.decoding import Ref, decode
from chatzeo.server.identity import (
    Revocations,
    ensure_authority,
    issue,
    revoke,
    save_identity,
)
from chatzeo.server.readguard import ReadIndex
from chatzeo.tls import load_identity

Z64 = b"\0" * 8


def state(**changes: Any) -> dict[str, Any]:
    base = {"key": "0123456789abcdef", "name": "plans", "kind": "room", "owner": "alice",
            "members": ("alice", "bob"), "session": Ref(b"\0" * 7 + b"\x09")}
    base.update(changes)
    return base


def refusal(*args: Any, **kwargs: Any) -> str:
    """What `access_problem` says of a change it must refuse (it fails if accepted)."""
    problem = access_problem(*args, **kwargs)
    assert problem is not None, "accepted"
    return problem


def test_access_rules() -> None:
    assert access_problem("alice", None, state()) is None
    assert "cannot create a private room owned by" in refusal("bob", None, state())
    assert "new session" in refusal("alice", None, state(), session_is_new=False)
    assert "owner must be one of" in refusal("alice", None, state(members=("bob",)))
    assert "sorted tuple" in refusal("alice", None, state(members=("bob", "alice")))
    assert "exactly two" in refusal("alice", None, state(kind="dm", members=("alice",)))
    assert "malformed" in refusal("alice", None, {**state(), "extra": 1})
    assert "malformed" in refusal("alice", None, state(key="../../etc"))
    assert "bad name" in refusal("alice", None, state(members=("alice", "b\x1bob")))
    grown = state(members=("alice", "bob", "carol"))
    assert access_problem("alice", state(), grown) is None
    assert "only the owner" in refusal("bob", state(), grown)
    assert "owner cannot change" in refusal(
        "alice", state(), state(owner="bob", members=("alice", "bob")))
    assert "session cannot change" in refusal(
        "alice", state(), state(session=Ref(b"\0" * 7 + b"\x0a")))
    dm = state(kind="dm", name="dm")
    assert "keeps its two members" in refusal(
        "alice", dm, state(kind="dm", name="dm", members=("alice", "carol")))


def test_private_room_methods() -> None:
    room = PrivateRoom("0123456789abcdef", "plans", "room", "alice", ["bob"])
    assert room.members == ("alice", "bob") and room.shown_name("bob") == "#plans"
    assert room.add_member("alice", "carol") and not room.add_member("alice", "carol")
    with pytest.raises(PermissionError):
        room.add_member("bob", "dave")
    with pytest.raises(Exception, match="owner cannot be removed"):
        room.remove_member("alice", "alice")
    assert room.remove_member("alice", "carol") and room.members == ("alice", "bob")
    dm = PrivateRoom("fedcba9876543210", "dm", "dm", "alice", ["bob"])
    assert dm.shown_name("alice") == "@bob" and dm.shown_name("bob") == "@alice"


def test_read_index_claims_only_new_objects(tmp_path: Path) -> None:
    storage = FileStorage(str(tmp_path / "chat.fs"))
    db = ZODB.DB(storage)
    connection = db.open()
    root = get_root(connection)
    from BTrees.OOBTree import OOBTree

    root.private = OOBTree()
    lobby = root.room("lobby")
    room = root.private["0123456789abcdef"] = PrivateRoom(
        "0123456789abcdef", "plans", "room", "alice", ["bob"])
    transaction.commit()
    room.session.post("secret", "alice")
    transaction.commit()
    index = ReadIndex.build(storage)
    private = {room._p_oid, room.session._p_oid, room.session._clock._p_oid,
               room.session._messages._p_oid, room.session.presence._p_oid}
    assert private <= set(index.room_of)
    assert not index.readable("carol", room.session._clock._p_oid)
    assert index.readable("bob", room.session._clock._p_oid)
    assert index.readable("carol", lobby._clock._p_oid)  # public
    # A commit that references the public lobby clock from the room claims nothing
    # that exists already; a new object it links joins the room.
    lobby_clock = lobby._clock._p_oid
    record = storage.load(room.session._p_oid)[0]
    fake_new = b"\0" * 7 + b"\x7f"
    index.apply([(room.session._p_oid, storage.lastTransaction(), record),
                 (fake_new, Z64, record)])
    assert index.readable("carol", lobby_clock)
    assert index.room_of.get(fake_new) is None  # not referenced by the room
    # Members change: the index follows and reports who joined.
    room.members = ("alice", "bob", "carol")
    transaction.commit()
    data, serial = storage.load(room._p_oid)
    changed = index.apply([(room._p_oid, serial, data)])
    assert changed == {room._p_oid: {"carol"}}
    assert index.readable("carol", room.session._clock._p_oid)
    assert decode(data)[0] == "chatzeo.privacy.PrivateRoom"
    connection.close()
    db.close()


def test_identity_issue_load_and_revoke(tmp_path: Path) -> None:
    authority = ensure_authority(tmp_path / "tls", ["example.test"])
    assert stat_mode(authority.ca_key) == 0o600 and stat_mode(authority.directory) == 0o700
    text, serial = issue(authority, "alice", server="127.0.0.1:9")
    path = tmp_path / "alice.chatzeo"
    save_identity(path, text)
    assert path.read_bytes() == text and stat_mode(path) == 0o600
    # An identity file holds a private key: it is never replaced, and no temporary
    # file is left beside it.
    with pytest.raises(IdentityError, match="exists already"):
        save_identity(path, b"another")
    assert path.read_bytes() == text and sorted(tmp_path.iterdir()) == [path, authority.directory]
    identity = load_identity(path)
    assert identity.name == "alice" and identity.server == "127.0.0.1:9"
    assert isinstance(identity.context, ssl.SSLContext)
    # The CA is kept across calls: the identity stays valid.
    assert ensure_authority(tmp_path / "tls").ca_cert.read_bytes() == authority.ca_cert.read_bytes()
    revocations = Revocations(authority.revoked)
    revocations.refresh()
    peer: dict[str, object] = {"serialNumber": serial.upper()}
    assert not revocations.is_revoked(peer)
    assert revoke(authority, "alice") == [serial]
    assert revocations.refresh() and revocations.is_revoked(peer)
    assert revoke(authority, "alice") == []  # nothing new to revoke
    # A broken list keeps the revocations already known.
    authority.revoked.write_text("{not json")
    revocations.refresh()
    assert revocations.is_revoked(peer)
    for bad in (b"", b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n"):
        broken = tmp_path / "broken.chatzeo"
        broken.write_bytes(bad)
        broken.chmod(0o600)
        with pytest.raises(InvalidInput, match="not a chatzeo identity file"):
            load_identity(broken)
    with pytest.raises(InvalidInput, match="cannot read"):
        load_identity(tmp_path / "missing.chatzeo")


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777
