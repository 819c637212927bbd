"""Shared fixtures: a real chatzeo ZEO server on a free loopback port, and waiting helpers.

The server is started exactly as users start it (`chatzeo serve` with the repo's
`zeo.conf`, overriding only the address and data directory) in its own process, so
it can be killed with -9 and restarted on the same port and data.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction

from chatzeo import get_root, open_db

REPO = Path(__file__).resolve().parent.parent
ZEO_CONF = REPO / "zeo.conf"


def require(thing: str, missing: str | None) -> None:
    """Skip the calling test when ``missing`` says why ``thing`` cannot run here, or fail
    when ``CHATZEO_REQUIRE_<THING>=1`` (CI sets it: there the real tests must run)."""
    if missing is None:
        return
    variable = f"CHATZEO_REQUIRE_{thing.upper()}"
    if os.environ.get(variable) == "1":
        pytest.fail(f"{variable}=1 but {missing}", pytrace=False)
    pytest.skip(missing)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(label: str, condition: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {label}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def chatzeo_command(*args: str) -> list[str]:
    """The argv that runs ``chatzeo ARGS`` with this interpreter."""
    return [sys.executable, "-m", "chatzeo", *args]


def stored(target: str, room: str) -> list[tuple[int, Any]]:
    """Every (key, record) of ``room`` (its tree, then its clock's pending entries),
    read through a fresh client, after checking they are in key order and the room's
    clock agrees with them (count, head and flushed)."""
    db = open_db(target, wait=30)
    try:
        manager = transaction.TransactionManager()
        connection = db.open(transaction_manager=manager)
        session = get_root(connection).rooms[room]
        tree, pending = list(session._messages.items()), list(session._clock.pending)
        items = tree + pending
        assert [key for key, _ in items] == sorted({key for key, _ in items})
        assert session._clock.count == len(items)
        assert not items or session._clock.head == items[-1][0]
        assert not tree or session._clock.flushed >= tree[-1][0]
        manager.abort()
        connection.close()
        return items
    finally:
        db.close()


class ServerProcess:
    """A `chatzeo serve` subprocess; ``address`` is ``127.0.0.1:PORT``."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        config: Path = ZEO_CONF,
        options: tuple[str, ...] = (),
    ):
        self.data_dir = data_dir
        self.options = options
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "server.log"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                chatzeo_command(
                    "serve",
                    "--config", str(self.config),
                    "--address", self.address,
                    "--data-dir", str(self.data_dir),
                    *self.options,
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(f"server on {self.address}", self._answers, timeout)
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"server exited: {self.log.read_text()[-2000:]}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode if self.process else None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A running `chatzeo serve` on a free port, stopped after the test."""
    process = ServerProcess(tmp_path / "server").start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def cli_env(server: ServerProcess, tmp_path: Path) -> dict[str, str]:
    """Environment for `chatzeo` subprocesses talking to ``server``."""
    env = dict(os.environ)
    env["CHATZEO_SERVER"] = server.address
    env["CHATZEO_DATA"] = str(tmp_path / "client-data")
    env.pop("CHATZEO_CONFIG", None)
    return env


class Backend:
    """A running shared database the invariant tests run against, by kind.

    ``target`` is what `chatzeo.open_db` (and every `chatzeo` command) accepts;
    ``crash()`` kills the database server with -9 and ``restart()`` brings it back
    on the same address with the same data.
    """

    kind = "abstract"
    target: str

    def crash(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class ZEOBackend(Backend):
    """`chatzeo serve` over a FileStorage."""

    kind = "zeo"

    def __init__(self, data_dir: Path):
        self.server = ServerProcess(data_dir).start()
        self.target = self.server.address

    def crash(self) -> None:
        self.server.kill()

    def restart(self) -> None:
        self.server.start()

    def close(self) -> None:
        self.server.stop()


class PostgresBackend(Backend):
    """A throwaway PostgreSQL cluster (tests/pgcluster.py), clients on RelStorage
    directly, prepared by `chatzeo init-db`. Skips (or, with
    ``CHATZEO_REQUIRE_POSTGRES=1``, fails) where PostgreSQL cannot run."""

    kind = "postgres"

    def __init__(self, data_dir: Path):
        from pgcluster import PostgresCluster, require_or_skip

        from chatzeo.initdb import init_db

        require_or_skip()
        self.cluster = PostgresCluster().start()
        try:
            self.target = self.cluster.create_database("chat")
            init_db(self.target)
        except BaseException:
            self.cluster.close()
            raise

    def crash(self) -> None:
        self.cluster.kill()

    def restart(self) -> None:
        self.cluster.start()

    def close(self) -> None:
        self.cluster.close()


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "zeo": ZEOBackend,
    "postgres": PostgresBackend,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each shared database chatzeo runs on, started for the test and stopped after."""
    running = BACKENDS[request.param](tmp_path / request.param)
    try:
        yield running
    finally:
        running.close()
