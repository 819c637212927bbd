"""Fixtures for testing and measuring chatzeo with real parts, as ZEO ships `ZEO.server()`.

What tests, benchmarks and scripts share, importable without pytest:

- `free_port` and `wait_until` (bounded in time, failing with the label it waited for);
- `ServerProcess`: a real ``chatzeo serve`` (or ZEO's own ``runzeo``, the control) on
  127.0.0.1 and a free port, with a TLS test PKI or ``--tls auto``, a guard mode and
  extra arguments; it starts, stops, is killed with -9 and restarts on the same port
  and data; every one still running is killed when the interpreter exits;
- `PostgresCluster`: a throwaway PostgreSQL server we started, never one we did not;
- `make_pki` and friends: a throwaway certificate authority (the openssl command);
- `percentile`: the one definition every benchmark report uses;
- `WireCounter`: what one ZEO client connection sends and receives;
- `require`: skip where a real part is missing, or fail where ``CHATZEO_REQUIRE_<THING>=1``
  says it must run (CI).

Everything here runs in the calling thread; servers run in processes of their own.
Nothing here is thread-safe; `ServerProcess` objects belong to the thread that made them.
"""

from __future__ import annotations

import atexit
import glob
import math
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn, Self, TypeVar

__all__ = [
    "free_port",
    "wait_until",
    "chatzeo_command",
    "require",
    "openssl_missing",
    "postgres_missing",
    "default_config",
    "ServerProcess",
    "write_server_config",
    "Pki",
    "make_pki",
    "client_context",
    "PostgresCluster",
    "percentile",
    "WireCounter",
]

_T = TypeVar("_T")


# -- waiting and ports -----------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The port is free when this returns, not reserved: another process may take it
    before the caller binds it (the same race as ZEO's own forker).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(
    label: str, condition: Callable[[], _T | None], timeout: float = 15.0
) -> _T:
    """Call ``condition`` until it returns something truthy, and return that.

    Polls with a delay growing from 5 ms to 100 ms; raises `AssertionError` naming
    ``label`` once ``timeout`` seconds have passed (as ZEO's ``forker.wait_until``),
    so a test fails with what it waited for. An exception from ``condition`` passes
    through at once.
    """
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


# -- what this machine has ---------------------------------------------------------------


def require(thing: str, missing: str | None) -> None:
    """Skip the calling test when ``missing`` says why ``thing`` cannot run here, or fail
    when ``CHATZEO_REQUIRE_<THING>=1`` (CI sets it: there the real tests must run).

    Does nothing when ``missing`` is None. Needs pytest (imported here, not at module
    level, so that benchmarks and scripts import this module without it).
    """
    if missing is None:
        return
    import pytest

    variable = f"CHATZEO_REQUIRE_{thing.upper()}"
    if os.environ.get(variable) == "1":
        pytest.fail(f"{variable}=1 but {missing}", pytrace=False)
    pytest.skip(missing)


def openssl_missing() -> str | None:
    """Why `make_pki` cannot run here, or None when it can."""
    return None if shutil.which("openssl") else "the openssl command is missing"


# -- chatzeo serve -------------------------------------------------------------------------


def default_config() -> Path:
    """The ``zeo.conf`` shipped with chatzeo (the one users start from)."""
    return Path(str(resources.files("chatzeo") / "zeo.conf"))


def write_server_config(
    path: Path, *, pki: Pki | None = None, transaction_timeout: float = 30,
    data_dir: Path | None = None, eventlog: bool = False,
) -> Path:
    """Write a ZEO server config at ``path`` and return it.

    With ``pki`` the server presents ``pki``'s server certificate and requires a client
    certificate its CA signed. ``data_dir`` (default: ``var`` beside the file, as
    `chatzeo serve` reads it) holds ``chat.fs``; ``eventlog`` logs to stderr at INFO,
    which plain ``runzeo`` needs to say anything. The address is a placeholder:
    `ServerProcess` passes its own.
    """
    ssl_section = ""
    if pki is not None:
        ssl_section = (
            f"\n  <ssl>\n    certificate {pki.cert('server')}\n    key {pki.key('server')}\n"
            f"    authenticate {pki.ca}\n  </ssl>"
        )
    log_section = (
        "<eventlog>\n  level INFO\n  <logfile>\n    path STDERR\n  </logfile>\n</eventlog>\n"
        if eventlog else ""
    )
    path.write_text(
        f"%define DATA_DIR {data_dir if data_dir is not None else 'var'}\n"
        "<zeo>\n"
        "  address 127.0.0.1:8765\n"
        "  invalidation-queue-size 10000\n"
        f"  transaction-timeout {transaction_timeout:g}{ssl_section}\n"
        "</zeo>\n"
        "<filestorage 1>\n"
        "  path $DATA_DIR/chat.fs\n"
        "</filestorage>\n"
        f"{log_section}"
    )
    return path


# Every ServerProcess that may still run: killed at exit, so that a test process that
# dies between start and stop (an interrupted run, a failing fixture) leaves none behind.
# A strong set: a server dropped unstopped must still be found (and its Popen kept).
_RUNNING: set[ServerProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_RUNNING):
        server.kill()


class ServerProcess:
    """A ``chatzeo serve`` subprocess on 127.0.0.1; ``address`` is ``127.0.0.1:PORT``.

    Started as users start it: ``config`` (default: the shipped ``zeo.conf``) with only
    the address and data directory overridden. ``pki`` writes a config into
    ``data_dir`` that requires client certificates from that test CA; ``tls="auto"``
    runs ``--tls auto`` (the server's own CA in ``data_dir/tls``; `invite` issues
    identities); ``guard`` is ``--guard``'s value; ``transaction_timeout`` writes a
    config with that timeout; ``options`` are further arguments. ``runzeo=True`` runs
    ZEO's own ``runzeo`` over the same kind of config instead: the control, what a
    server without chatzeo does.

    `start` waits until the port accepts and, if it never does, stops the process and
    raises with the end of its log; `stop` (SIGTERM), `kill` (-9, as a crash) and
    `restart` keep the port and the data. Used as a context manager it is stopped on
    the way out; one still running at interpreter exit is killed.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        config: Path | None = None,
        options: Sequence[str] = (),
        *,
        pki: Pki | None = None,
        tls: str | None = None,
        guard: str | None = None,
        transaction_timeout: float | None = None,
        runzeo: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.pki = pki
        self.runzeo = runzeo
        arguments = list(options)
        if tls is not None:
            arguments += ["--tls", tls]
        if guard is not None:
            arguments += ["--guard", guard]
        self.options = tuple(arguments)
        if config is None and (pki is not None or transaction_timeout is not None or runzeo):
            data_dir.mkdir(parents=True, exist_ok=True)
            config = write_server_config(
                data_dir / "zeo-test.conf", pki=pki,
                transaction_timeout=30 if transaction_timeout is None else transaction_timeout,
                data_dir=data_dir, eventlog=runzeo,
            )
        self.config = config if config is not None else default_config()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "server.log"

    def command(self) -> list[str]:
        """The argv `start` runs."""
        if not self.runzeo:
            return chatzeo_command(
                "serve", "--config", str(self.config), "--address", self.address,
                "--data-dir", str(self.data_dir), *self.options,
            )
        # runzeo has no --address override for a config: write the address into a copy.
        text = self.config.read_text().replace("127.0.0.1:8765", self.address)
        config = self.data_dir / "runzeo.conf"
        config.write_text(text)
        return [sys.executable, "-m", "ZEO.runzeo", "-C", str(config), *self.options]

    def start(self, timeout: float = 30.0) -> Self:
        """Start the server (again, after `stop` or `kill`) and wait until it accepts."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT
            )
        _RUNNING.add(self)
        try:
            wait_until(f"server on {self.address}", self._answers, timeout)
        except BaseException:  # one that never answered must not be left running
            self.kill()
            raise
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"server exited with {self.process.returncode}: {self.log_text()[-2000:]}"
            )
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    @property
    def pid(self) -> int:
        """The server process's id (it must have been started)."""
        assert self.process is not None, "the server was never started"
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9, as a crash would; waits for the process to go."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        _RUNNING.discard(self)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (kill -9 after ``timeout``); the exit status, None if never
        started."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        _RUNNING.discard(self)
        return self.process.returncode if self.process is not None else None

    def restart(self, timeout: float = 30.0) -> Self:
        """Stop (if running) and start again on the same port with the same data."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self if self.running() else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        """Everything the server wrote so far (stdout and stderr)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def logged(self, text: str, timeout: float = 15.0) -> str:
        """Wait for ``text`` in the server log; return the first line holding it."""
        wait_until(f"{text!r} in the server log", lambda: text in self.log_text(), timeout)
        return next(line for line in self.log_text().splitlines() if text in line)

    def rss(self) -> int:
        """The server's resident memory in bytes (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for process {self.pid}")

    def context(self, name: str) -> ssl.SSLContext | None:
        """The client TLS context of ``name``'s test certificate; None without ``pki``."""
        return client_context(self.pki, name) if self.pki is not None else None

    def cli_args(self, name: str) -> list[str]:
        """The ``chatzeo`` options that connect to this server as ``name``."""
        args = ["--server", self.address]
        if self.pki is not None:
            args += ["--tls-cert", str(self.pki.cert(name)), "--tls-key",
                     str(self.pki.key(name)), "--tls-ca", str(self.pki.ca)]
        return args

    def invite(self, name: str, out: Path) -> Path:
        """Under ``tls="auto"``: ``chatzeo invite NAME`` into ``out`` (an identity file)."""
        done = subprocess.run(
            chatzeo_command("invite", name, "--data-dir", str(self.data_dir),
                            "--server", self.address, "--out", str(out)),
            capture_output=True, text=True, timeout=60,
        )
        if done.returncode != 0:
            raise AssertionError(f"chatzeo invite {name} failed: {done.stderr.strip()}")
        return out


# -- a test certificate authority ------------------------------------------------------------

_LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1, DNS:localhost
"""


@dataclass(frozen=True)
class Pki:
    """A throwaway CA in ``directory``: ``ca`` is its certificate, and each name it
    signed has ``NAME.pem`` and ``NAME.key`` beside it (``server`` for the server)."""

    directory: Path
    ca: Path

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def make_pki(directory: Path, clients: tuple[str, ...] = ("alice", "bob")) -> Pki:
    """A CA in ``directory`` that signed ``server`` (for 127.0.0.1) and one certificate
    per client name (subject ``CN=<name>``), all P-256, valid two days.

    Raises `subprocess.CalledProcessError` if the openssl command fails
    (`openssl_missing` says whether it exists).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *curve, "-keyout", ca_key, "-out", ca, "-days", "2",
        "-subj", "/CN=chatzeo test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    extensions = directory / "leaf.ext"
    extensions.write_text(_LEAF_EXTENSIONS)
    for name in ("server", *clients):
        request = directory / f"{name}.csr"
        _openssl(
            "req", *curve, "-keyout", directory / f"{name}.key", "-out", request,
            "-subj", f"/CN={name}",
        )
        _openssl(
            "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key,
            "-CAcreateserial", "-out", directory / f"{name}.pem", "-days", "2",
            "-extfile", extensions,
        )
    return Pki(directory, ca)


def client_context(pki: Pki, name: str) -> ssl.SSLContext:
    """A client context presenting ``name``'s certificate and trusting only the CA."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.check_hostname = False  # the CA is trusted for this one server only
    context.load_cert_chain(str(pki.cert(name)), str(pki.key(name)))
    return context


# -- PostgreSQL --------------------------------------------------------------------------------

_PG_SUPERUSER = "chatzeo"


def _postgres_binaries() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None:
    ``$PATH`` first, then Debian's /usr/lib/postgresql/VERSION/bin, newest first."""
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


def _postgres_user() -> str | None:
    """Under root, the user PostgreSQL runs as (it refuses root): Debian's ``postgres``,
    else ``nobody``."""
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return None


def postgres_missing() -> str | None:
    """Why `PostgresCluster` cannot run here, or None when it can."""
    if _postgres_binaries() is None:
        return (
            "PostgreSQL server binaries not found (apt-get install -y postgresql; "
            "looked on $PATH and in /usr/lib/postgresql/*/bin)"
        )
    try:
        import psycopg2  # noqa: F401
        import relstorage  # noqa: F401
    except ImportError as error:
        return f"the 'pg' extra is not installed ({error}): pip install -e '.[pg]'"
    if os.geteuid() == 0 and _postgres_user() is None:
        return "running as root and neither a 'postgres' nor a 'nobody' user exists"
    return None


def _no_postgres() -> NoReturn:
    raise RuntimeError(postgres_missing())


class PostgresCluster:
    """One throwaway PostgreSQL server we started; ``uri(db)`` is a chatzeo target for it.

    `start` runs ``initdb`` into a fresh temporary directory (first time only) and
    starts ``postgres`` on a free loopback port with its unix socket in that directory.
    Under root (CI) both run as the ``postgres`` user (or ``nobody``) in a directory
    that user owns under /tmp. `kill` is kill -9 of the postmaster, `start` brings it
    back on the same port and data, `close` stops it and deletes everything.
    """

    def __init__(self, *, fsync: bool = True, max_connections: int = 300) -> None:
        binaries = _postgres_binaries()
        if binaries is None:
            _no_postgres()
        self.bin = binaries
        self.port = free_port()
        self.fsync = fsync
        self.max_connections = max_connections
        self.user = _postgres_user() if os.geteuid() == 0 else None
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

    def start(self, timeout: float = 30.0) -> Self:
        """initdb (first time only) and start the server; waits until it accepts."""
        if not self.data.exists():
            subprocess.run(
                self._command(
                    str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                    "-U", _PG_SUPERUSER, "-E", "UTF8", "--no-sync",
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
            time.sleep(0.2)  # pg_ctl itself waited; this only paces the retries

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

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_until(f"postmaster {pid} to exit", gone, timeout=10)

    def stop(self) -> None:
        """Stop the server at once (the data is thrown away by `close`)."""
        if self.postmaster_pid() is None:
            return
        subprocess.run(
            self._command(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
            ),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        """A libpq connection string for ``database`` as the superuser."""
        return f"host=127.0.0.1 port={self.port} user={_PG_SUPERUSER} dbname={database}"

    def uri(self, database: str) -> str:
        """The chatzeo target (a zodburi ``postgres://`` URI) for ``database``."""
        return f"postgres://{_PG_SUPERUSER}@127.0.0.1:{self.port}/{database}"


# -- measuring ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` (0..1) percentile of ``values`` by the nearest-rank method.

    The smallest value such that at least ``fraction`` of all values are at or below
    it: the value at 1-based rank ``ceil(fraction * n)`` of the sorted values (rank 1
    for ``fraction`` 0). Always a value that was measured, never an interpolation; for
    an even count the p50 is the lower of the two middle values. NaN if ``values`` is
    empty. Every benchmark report and load script computes its p50/p90/p99 here, so
    their figures compare.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within 0..1, not {fraction!r}")
    if not values:
        return math.nan
    ordered = sorted(values)
    # The epsilon keeps float error from moving a whole rank (0.07 * 100 is 7.000000000000001).
    rank = max(1, math.ceil(fraction * len(ordered) - 1e-9))
    return ordered[rank - 1]


class WireCounter:
    """Counts the bytes one ZEO client connection receives and the requests it sends
    (heartbeats apart), by wrapping its protocol object's ``data_received`` and
    ``write_message`` (ZEO internals, 6.x; a measuring instrument, not an API).

    Counts are updated on ZEO's IO thread; read them from another thread only as a
    figure, not for synchronisation. A reconnection makes a new protocol object that
    is not counted.
    """

    def __init__(self, storage: Any) -> None:
        self.bytes = 0
        self.requests = 0
        protocol = storage._server.client.protocol
        received, write = protocol.data_received, protocol.write_message
        heartbeat = getattr(protocol, "heartbeat_bytes", None)

        def data_received(data: bytes) -> None:
            self.bytes += len(data)
            received(data)

        def write_message(message: bytes) -> None:
            if message != heartbeat:
                self.requests += 1
            write(message)

        protocol.data_received = data_received
        protocol.write_message = write_message
