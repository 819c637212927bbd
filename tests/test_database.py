"""open_db: every kind of target, and clear errors for the bad ones."""

from __future__ import annotations

import subprocess
import time

import pytest
import ZODB

from chatzeo import ChatClient, InvalidTarget, ServerUnavailable, open_db
from chatzeo.database import parse_address
from chatzeo.testing import chatzeo_command, free_port, wait_until


def _round_trip(db: ZODB.DB) -> list[str]:
    """Post through one client and read it back through another."""
    writer, reader = ChatClient(db), ChatClient(db)
    try:
        reader.join("probe")
        writer.join("probe")
        writer.send("ping")
        wait_until("ping", reader.wait, timeout=10)
        return [m.text for m in reader.receive()]
    finally:
        writer.close()
        reader.close()
        db.close()


def test_memory_and_file_uris(tmp_path):
    assert _round_trip(open_db("memory://")) == ["ping"]
    assert _round_trip(open_db(f"file://{tmp_path}/uri.fs")) == ["ping"]
    assert (tmp_path / "uri.fs").exists()


def test_zconfig_file(tmp_path):
    config = tmp_path / "db.conf"
    config.write_text(
        f"<zodb>\n  <filestorage>\n    path {tmp_path}/conf.fs\n  </filestorage>\n</zodb>\n"
    )
    assert _round_trip(open_db(str(config))) == ["ping"]


def test_default_is_an_embedded_filestorage_in_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATZEO_DATA", str(tmp_path / "data"))
    assert _round_trip(open_db()) == ["ping"]
    assert (tmp_path / "data" / "chat.fs").exists()


def test_zeo_over_a_unix_socket(tmp_path):
    socket_path = str(tmp_path / "chat.sock")
    server = subprocess.Popen(
        chatzeo_command("serve", "--address", socket_path, "--data-dir", str(tmp_path / "d")),
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until("socket", lambda: (tmp_path / "chat.sock").exists(), timeout=30)
        assert _round_trip(open_db(socket_path)) == ["ping"]
        assert _round_trip(open_db(f"zeo://{socket_path}")) == ["ping"]
    finally:
        server.terminate()
        server.wait(30)


def test_an_absent_server_is_a_clear_error_within_the_bound():
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="within 1s"):
        open_db(f"127.0.0.1:{free_port()}", wait=1)
    assert time.monotonic() - started < 20


@pytest.mark.parametrize(
    "target",
    ["localhost", "host:port", "127.0.0.1:70000", "nosuch://x", "missing.conf", ":80"],
)
def test_bad_targets_are_refused(target):
    with pytest.raises(InvalidTarget):
        open_db(target, wait=1)


def test_a_broken_config_file_is_one_line(tmp_path):
    config = tmp_path / "broken.conf"
    config.write_text("<zodb>\n  <filestorage>\n")
    with pytest.raises(InvalidTarget) as caught:
        open_db(str(config))
    assert "\n" not in str(caught.value)


def test_parse_address_forms():
    assert parse_address("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_address("[::1]:9") == ("::1", 9)
    assert parse_address("/run/chat.sock") == "/run/chat.sock"
