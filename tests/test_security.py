"""Trust (docs/security.md): loopback by default, TLS with client certificates, and records
that would run code when unpickled, on clients and in the server's conflict resolution."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import transaction
import ZODB
from hostile import Payload, Trojan
from support import REPO
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ServerException
from ZODB.POSException import ConflictError

from chatzeo import get_root
from chatzeo.database import DEFAULT_ADDRESS, parse_address
from chatzeo.errors import TrustViolation
from chatzeo.server.serve import load_config
from chatzeo.testing import (
    Pki,
    ServerProcess,
    chatzeo_command,
    free_port,
    make_pki,
    openssl_missing,
    require,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)
TESTS = Path(__file__).resolve().parent


def test_server_binds_loopback_by_default(tmp_path: Path) -> None:
    assert parse_address(DEFAULT_ADDRESS) == ("127.0.0.1", 8765)
    for config in (REPO / "zeo.conf", REPO / "chatzeo" / "zeo.conf"):
        loaded = load_config(config, data_dir=tmp_path)
        assert loaded.zeo.address.address == ("127.0.0.1", 8765), config


# -- TLS -----------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Pki, Pki]]:
    require("openssl", openssl_missing())
    pki = make_pki(tmp_path / "pki", clients=("client",))
    rogue = make_pki(tmp_path / "rogue", clients=("rogue",))  # another CA altogether
    # The repo's zeo.conf with its <ssl> section switched on.
    text = (REPO / "zeo.conf").read_text()
    sketch = text[text.index("  # <ssl>"):text.index("  # </ssl>") + len("  # </ssl>")]
    enabled = "\n".join(line.replace("# ", "", 1) for line in sketch.splitlines())
    enabled = enabled.replace("$DATA_DIR/server.pem", str(pki.cert("server")))
    enabled = enabled.replace("$DATA_DIR/server.key", str(pki.key("server")))
    enabled = enabled.replace("$DATA_DIR/clients.pem", str(pki.ca))
    config = tmp_path / "zeo-tls.conf"
    config.write_text(text.replace(sketch, enabled))
    assert "<ssl>" in config.read_text() and "# <ssl>" not in config.read_text()
    server = ServerProcess(tmp_path / "server", config=config).start()
    try:
        yield server, pki, rogue
    finally:
        server.stop()


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        chatzeo_command(*args), capture_output=True, timeout=120, env=env or dict(os.environ)
    )
    return (
        result.returncode,
        result.stdout.decode(),
        result.stderr.decode(),
        time.monotonic() - started,
    )


def test_tls_client_certificates(tls_server: tuple[ServerProcess, Pki, Pki]) -> None:
    server, pki, rogue = tls_server

    def tls(owner: Pki, name: str, ca: Pki) -> list[str]:
        return ["--tls-cert", str(owner.cert(name)), "--tls-key", str(owner.key(name)),
                "--tls-ca", str(ca.ca)]

    base = ["--server", server.address, "--room", "lobby"]
    # The guard (on with TLS) requires the author to be the certificate's name.
    signed = tls(pki, "client", pki)
    status, _, err, _ = cli("send", *base, *signed, "--name", "client", "signed by the CA")
    assert status == 0, err
    expired, selfsigned = _expired_and_self_signed(pki, server.data_dir.parent / "odd")
    refusals = [
        ([], "answered, but not as a chatzeo server: it said nothing; does it need TLS"),
        (tls(rogue, "rogue", pki), "refused this certificate: it is not signed by a CA the"),
        (expired, "refused this certificate: it expired on "),
        (selfsigned, "refused this certificate: it is self-signed"),
        (tls(rogue, "rogue", rogue), "has a certificate --tls-ca does not vouch for"),
    ]
    for refused, says in refusals:
        status, _, err, elapsed = cli("send", *base, "--wait", "20", *refused, "intruder")
        assert status == 1, (refused, err)
        assert err.count("\n") == 1 and "Traceback" not in err
        assert says in err, (refused, err)
        assert elapsed < 20  # said at once: waiting would not mend it
    # Environment variables work as the options do; only the signed message is there.
    env = {**os.environ, "CHATZEO_TLS_CERT": str(pki.cert("client")),
           "CHATZEO_TLS_KEY": str(pki.key("client")), "CHATZEO_TLS_CA": str(pki.ca)}
    status, out, err, _ = cli("history", *base, env=env)
    assert status == 0, err
    assert out.count("\n") == 1 and "signed by the CA" in out
    # A certificate without a CA is a usage mistake, caught before connecting.
    status, _, err, _ = cli("send", *base, "--tls-cert", str(pki.cert("client")), "x")
    assert status == 1 and "--tls-ca" in err


def _expired_and_self_signed(pki: Pki, directory: Path) -> tuple[list[str], list[str]]:
    """TLS options for a certificate the CA signed but that expired yesterday, and
    for one that signed itself."""
    directory.mkdir(parents=True, exist_ok=True)
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    key, request, cert = (str(directory / name) for name in ("old.key", "old.csr", "old.pem"))
    openssl("req", *curve, "-keyout", key, "-out", request, "-subj", "/CN=client")
    openssl("x509", "-req", "-in", request, "-CA", str(pki.ca), "-CAkey",
            str(pki.directory / "ca.key"), "-CAcreateserial", "-out", cert, "-days", "-1")
    own_key, own = str(directory / "own.key"), str(directory / "own.pem")
    openssl("req", "-x509", *curve, "-keyout", own_key, "-out", own, "-days", "2",
            "-subj", "/CN=client")
    ca = ["--tls-ca", str(pki.ca)]
    return (["--tls-cert", cert, "--tls-key", key, *ca],
            ["--tls-cert", own, "--tls-key", own_key, *ca])


# -- hostile records, loaded by clients --------------------------------------------


def plain_db(address: str) -> ZODB.DB:
    """A client with ZODB's defaults: it imports whatever a record names."""
    host, port = address.split(":")
    return ZODB.DB(ClientStorage((host, int(port)), wait_timeout=30))


def test_clients_refuse_records_that_would_run_code(
    server: ServerProcess, cli_env: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "client-marker"
    # chatzeo serve refuses both records outright...
    hostile = plain_db(server.address)
    try:
        # (ZODB's plain client gets the refusal as ZEO's ServerException.)
        refusal = (TrustViolation, ServerException)
        with (
            pytest.raises(refusal, match=r"names posix\.system, which is not allowed"),
            hostile.transaction() as connection,
        ):
            room = get_root(connection).room("lobby")
            room._messages[room._clock.head + 1] = Payload(str(marker))
    finally:
        hostile.close()
    # ...a server that does not check (plain ZEO; here `--guard off`) stores them.
    server.stop()
    unchecked = ServerProcess(server.data_dir, server.port, options=("--guard", "off")).start()
    try:
        status, _, err, _ = cli("send", "--room", "lobby", "hello", env=cli_env)
        assert status == 0, err
        hostile = plain_db(unchecked.address)
        try:
            # A global inside the state pickle of the room's message tree...
            with hostile.transaction() as connection:
                room = get_root(connection).rooms["lobby"]
                room._messages[room._clock.head + 1] = Payload(str(marker))
            # chatzeo's readers load nothing of it, and show a placeholder for it.
            status, out, err, _ = cli("history", "--room", "lobby", env=cli_env)
            assert status == 0 and "Traceback" not in err, err
            assert "[malformed message record]" in out and "hello" in out, out
            # ...and a record whose class chatzeo does not know.
            with hostile.transaction() as connection:
                get_root(connection).rooms["trap"] = Trojan(str(marker))
            status, out, err, _ = cli("rooms", env=cli_env)
            assert status == 0 and "Traceback" not in err, err
            assert "[malformed room]" in out, out
        finally:
            hostile.close()
        assert not marker.exists()
        _live_payload_runs_in_a_plain_client(unchecked, marker)
    finally:
        unchecked.stop()


def _live_payload_runs_in_a_plain_client(server: ServerProcess, marker: Path) -> None:
    # The payload is live: a client with ZODB's defaults runs it on load.
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = (
        "import sys, ZODB; from ZEO.ClientStorage import ClientStorage; "
        f"db = ZODB.DB(ClientStorage(('127.0.0.1', {server.port}), wait_timeout=30)); "
        "c = db.open(); list(c.root()['chatzeo'].rooms['lobby']._messages.items())"
    )
    victim = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    _, victim_err = victim.communicate(timeout=60)
    assert victim.returncode == 0, victim_err
    assert int(marker.read_text()) == victim.pid


# -- hostile records in the server's conflict resolution ----------------------------


def conflict_with_payload(address: str, marker: Path, payload_first: bool) -> str | None:
    """Two clients change the same presence bucket from the same start; one of the two
    changes holds the payload. Returns the name of the writer that got a ConflictError."""
    benign, evil = plain_db(address), plain_db(address)
    try:
        managers = {"benign": transaction.TransactionManager(),
                    "evil": transaction.TransactionManager()}
        connections = {"benign": benign.open(transaction_manager=managers["benign"]),
                       "evil": evil.open(transaction_manager=managers["evil"])}
        trees = {}
        for name, connection in connections.items():
            managers[name].begin()
            trees[name] = get_root(connection).rooms["lobby"].presence
            len(trees[name])  # loaded at the same state by both
        trees["benign"]["lease-bob"] = ("bob", 1.0)
        trees["evil"]["lease-eve"] = Payload(str(marker))
        order = ["evil", "benign"] if payload_first else ["benign", "evil"]
        loser = None
        for name in order:
            try:
                managers[name].commit()
            except (ConflictError, TrustViolation, ServerException):
                managers[name].abort()
                loser = name
        for connection in connections.values():
            connection.close()
        return loser
    finally:
        benign.close()
        evil.close()


def prepare_room(address: str) -> None:
    db = plain_db(address)
    try:
        with db.transaction() as connection:
            get_root(connection).room("lobby")
    finally:
        db.close()


@pytest.mark.parametrize("payload_first", [False, True], ids=["payload-second", "payload-first"])
def test_chatzeo_server_refuses_payload_in_conflict_resolution(
    tmp_path: Path, payload_first: bool
) -> None:
    # With its record rules off, so that the payload reaches conflict resolution.
    server = ServerProcess(tmp_path / "unchecked", options=("--guard", "off")).start()
    try:
        marker = tmp_path / "server-marker"
        prepare_room(server.address)
        loser = conflict_with_payload(server.address, marker, payload_first)
        # The second committer's change needed resolution, which refused the payload.
        assert loser == ("benign" if payload_first else "evil")
        assert not marker.exists()
        wait_until(
            "the refusal in the server log",
            lambda: "conflict resolution refused global posix.system" in server.log.read_text(),
        )
    finally:
        server.stop()


@pytest.mark.parametrize("payload_first", [False, True], ids=["payload-second", "payload-first"])
def test_chatzeo_server_refuses_the_payload_before_any_resolution(
    server: ServerProcess, tmp_path: Path, payload_first: bool
) -> None:
    marker = tmp_path / "server-marker"
    prepare_room(server.address)
    # The record rules refuse the payload's commit itself, whichever comes first.
    assert conflict_with_payload(server.address, marker, payload_first) == "evil"
    assert not marker.exists()
    wait_until("the refusal in the server log",
               lambda: "names posix.system, which is not allowed" in server.log.read_text())


def test_plain_zeo_server_runs_payload_in_conflict_resolution(tmp_path: Path) -> None:
    """The same attack on a plain ``runzeo``: the payload runs inside the server."""
    marker = tmp_path / "server-marker"
    port = free_port()
    log = open(tmp_path / "runzeo.log", "wb")  # noqa: SIM115 (closed below)
    runzeo = subprocess.Popen(
        [sys.executable, "-m", "ZEO.runzeo", "-a", f"127.0.0.1:{port}",
         "-f", str(tmp_path / "plain.fs")],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        address = f"127.0.0.1:{port}"
        prepare_room(address)
        assert conflict_with_payload(address, marker, payload_first=False) is None
        wait_until("the payload's marker", marker.exists)
        wait_until("the marker's pid", lambda: marker.read_text().strip())
        assert int(marker.read_text()) == runzeo.pid
    finally:
        runzeo.terminate()
        runzeo.wait(15)
        log.close()
