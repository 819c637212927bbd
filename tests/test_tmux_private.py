"""Private rooms and direct messages in `chatzeo chat`, in a real terminal: two users
with identity files from ``chatzeo invite``, against a real ``chatzeo serve --tls auto``
(set up as tests/test_private.py does), driven and read back through tmux.

Without tmux these tests skip, or fail when ``CHATZEO_REQUIRE_TMUX=1`` (CI sets it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO
from test_tmux import EXITED, Pane, Tmux, client_env, tmux  # noqa: F401 (tmux: the fixture)

from chatzeo.testing import ServerProcess, chatzeo_command, wait_until

pytestmark = [pytest.mark.tmux, pytest.mark.timeout(180)]


@pytest.fixture
def identities(tmp_path: Path) -> Iterator[tuple[ServerProcess, dict[str, Path]]]:
    server = ServerProcess(tmp_path / "data", options=("--tls", "auto")).start()
    try:
        found = {}
        for name in ("alice", "bob"):
            out = tmp_path / f"{name}.chatzeo"
            done = subprocess.run(
                chatzeo_command("invite", name, "--config", str(REPO / "zeo.conf"),
                                "--data-dir", str(server.data_dir),
                                "--server", server.address, "--out", str(out)),
                capture_output=True, text=True, timeout=60, cwd=REPO,
                env=dict(os.environ),
            )
            assert done.returncode == 0, done.stderr
            found[name] = out
        yield server, found
    finally:
        server.stop()


def prompt_of(pane: Pane) -> str:
    """The last input prompt on screen (``[label] name>``), "" mid-redraw."""
    rows = [row for row in pane.lines() if row.startswith("[") and "> " in row + " "]
    return rows[-1] if rows else ""


def status_of(pane: Pane) -> str:
    rows = [row for row in pane.lines() if "| connected" in row]
    return rows[-1] if rows else ""


def test_private_rooms_and_direct_messages_in_the_terminal(
    tmux: Tmux, identities: tuple[ServerProcess, dict[str, Path]], tmp_path: Path  # noqa: F811
) -> None:
    _, files = identities
    panes = {}
    for name in ("alice", "bob"):
        argv = [sys.executable, "-m", "chatzeo", "chat", "--identity", str(files[name])]
        panes[name] = tmux.open(name, argv, client_env(tmp_path))
        panes[name].wait_for(f"[#lobby] {name}>", "connected")
    alice, bob = panes["alice"], panes["bob"]

    alice.enter("/create plans")
    wait_until("alice's prompt in the private room",
               lambda: prompt_of(alice) == "[#plans (private)] alice>")
    wait_until("alice's bar names it once",
               lambda: status_of(alice).startswith(" #plans (private) "))
    alice.enter("/invite bob")
    alice.wait_for("-- invited bob")
    bob.enter("/join plans")
    wait_until("bob's prompt in the private room",
               lambda: prompt_of(bob) == "[#plans (private)] bob>")
    alice.enter("only for members")
    bob.wait_for("<alice> only for members")

    # bob opens the conversation with alice, then goes back to the lobby: what alice
    # sends him there is said in the lobby, with where to read it.
    bob.enter("/query alice")
    wait_until("bob's prompt in the conversation", lambda: prompt_of(bob) == "[@alice] bob>")
    wait_until("bob's bar names it once", lambda: status_of(bob).startswith(" @alice "))
    bob.enter("/switch lobby")
    wait_until("bob back in the lobby", lambda: prompt_of(bob) == "[#lobby] bob>")
    alice.enter("/msg bob psst")
    bob.wait_for("-- 1 direct message from alice in @alice (Alt-3 or /switch @alice to read)")
    assert "psst" not in bob.screen()  # counted and announced, not shown in the lobby
    bob.enter("/switch @alice")
    wait_until("bob in the conversation again", lambda: prompt_of(bob) == "[@alice] bob>")
    bob.wait_for("<alice> psst")

    for pane in (alice, bob):
        screen = pane.screen()
        assert "##" not in screen and "#@" not in screen, screen
        pane.enter("/quit")
        pane.wait_for(f"{EXITED} 0")
