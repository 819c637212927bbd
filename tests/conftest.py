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
from support import Backend, PostgresBackend, ZEOBackend
from ZODB.FileStorage import FileStorage
from ZODB.MappingStorage import MappingStorage

from chatzeo.testing import ServerProcess


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
    """An in-process database in memory (MappingStorage), closed after the test."""
    database = ZODB.DB(MappingStorage())
    yield database
    database.close()


@pytest.fixture
def file_db(tmp_path: Path) -> Iterator[ZODB.DB]:
    """An in-process FileStorage database (it resolves conflicts, as ZEO's server does),
    closed after the test."""
    database = ZODB.DB(FileStorage(str(tmp_path / "data.fs")))
    yield database
    database.close()
