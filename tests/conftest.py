"""Shared fixtures: a real chatzeo ZEO server on a free loopback port, and the shared
databases the invariant tests run on.

The server is `chatzeo.testing.ServerProcess`: `chatzeo serve` with the shipped
`zeo.conf`, overriding only the address and data directory, in its own process, so
it can be killed with -9 and restarted on the same port and data. Helpers live in
`chatzeo.testing` (running chatzeo) and `tests/support.py` (this repository); test
modules import those, never this file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ZODB
from ZODB.MappingStorage import MappingStorage

from chatzeo.testing import PostgresCluster, ServerProcess, postgres_missing, require


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
    """A throwaway PostgreSQL cluster (`chatzeo.testing.PostgresCluster`), clients on RelStorage
    directly, prepared by `chatzeo init-db`. Skips (or, with
    ``CHATZEO_REQUIRE_POSTGRES=1``, fails) where PostgreSQL cannot run."""

    kind = "postgres"

    def __init__(self, data_dir: Path):
        from chatzeo.initdb import init_db

        require("postgres", postgres_missing())
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


@pytest.fixture
def db() -> Iterator[ZODB.DB]:
    """A database in memory (MappingStorage), closed after the test."""
    database = ZODB.DB(MappingStorage())
    yield database
    database.close()
