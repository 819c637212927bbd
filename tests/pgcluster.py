"""A throwaway PostgreSQL cluster for tests and benchmarks, never one we did not start.

`PostgresCluster.start` runs Debian's ``initdb`` into a fresh temporary directory and
starts ``postgres`` on a free loopback port with its unix socket in that directory.
PostgreSQL refuses to run as root, so under root (CI's ``.ci/run``) both run as the
``postgres`` user (Debian's package creates it) or else ``nobody``, in a directory
that user owns under /tmp (pytest's own tmp dirs are private to root).

`find_binaries` explains what is missing; `require_or_skip` turns that into a skip,
or into a failure when ``CHATZEO_REQUIRE_POSTGRES=1`` (CI sets it).

Runs in the calling thread; the server runs in its own processes.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostgresCluster", "find_binaries", "require_or_skip", "missing_reason"]

SUPERUSER = "chatzeo"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def find_binaries() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None.

    ``$PATH`` first (here /usr/local/bin links to them), then Debian's
    /usr/lib/postgresql/VERSION/bin, newest version first.
    """
    found = shutil.which("initdb")
    candidates = [Path(os.path.realpath(found)).parent] if found else []
    candidates += sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def missing_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    if find_binaries() is None:
        return (
            "PostgreSQL server binaries not found (apt-get install -y postgresql; "
            "looked on $PATH and in /usr/lib/postgresql/*/bin)"
        )
    try:
        import psycopg2  # noqa: F401
        import relstorage  # noqa: F401
    except ImportError as error:
        return f"the 'pg' extra is not installed ({error}): pip install -e '.[pg]'"
    if os.geteuid() == 0 and _run_as_user() is None:
        return "running as root and neither a 'postgres' nor a 'nobody' user exists"
    return None


def require_or_skip() -> None:
    """Skip the calling test if PostgreSQL cannot run here, or fail if it must."""
    from conftest import require

    require("postgres", missing_reason())


def _run_as_user() -> str | None:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return None


class PostgresCluster:
    """One PostgreSQL server we started; ``uri(db)`` is a chatzeo target for it."""

    def __init__(self, *, fsync: bool = True, max_connections: int = 300) -> None:
        binaries = find_binaries()
        if binaries is None:
            raise RuntimeError(missing_reason())
        self.bin = binaries
        self.port = _free_port()
        self.fsync = fsync
        self.max_connections = max_connections
        self.user = _run_as_user() if os.geteuid() == 0 else None
        self.base = Path(tempfile.mkdtemp(prefix="chatzeo-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)

    def _command(self, *argv: str) -> list[str]:
        if self.user is None:
            return list(argv)
        return ["runuser", "-u", self.user, "--", *argv]

    def start(self, timeout: float = 30.0) -> PostgresCluster:
        """initdb (first time only) and start the server; waits until it accepts."""
        if not self.data.exists():
            subprocess.run(
                self._command(
                    str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                    "-U", SUPERUSER, "-E", "UTF8", "--no-sync",
                ),
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.base,
            )
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1"
            f" -c fsync={'on' if self.fsync else 'off'}"
            f" -c max_connections={self.max_connections}"
        )
        deadline = time.monotonic() + timeout
        while True:
            # After a kill -9 the old backends may still hold shared memory for a
            # moment; the new postmaster refuses to start until they are gone.
            started = subprocess.run(
                self._command(
                    str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                    "-o", options, "-w", "-t", str(int(timeout)), "start",
                ),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.base,
            )
            if started.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """kill -9 the postmaster, as a crash would; its backends notice and exit."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server at once (the data is thrown away by `close`)."""
        if self.postmaster_pid() is None:
            return
        subprocess.run(
            self._command(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
            ),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its chatzeo target URI."""
        import psycopg2

        connection = psycopg2.connect(self.dsn("postgres"))
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.uri(name)

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"

    def uri(self, database: str) -> str:
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{database}"
