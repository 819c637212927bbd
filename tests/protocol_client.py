"""What a hostile ZEO client sends, below ZODB: raw protocol calls and raw frames.

`RawClient` is ZEO's own `ClientStorage` used for its connection only: `call` and
`cast` send any method with any arguments (synchronous and asynchronous, as ZEO's
client does), `begin`/`store`/`vote`/`finish` drive a transaction by hand with a
client-chosen tid, status or extension. `raw_socket` speaks the framing itself, to
send bytes no ZEO client would (a pickle that calls a global, a 64 MiB frame).
`Served` is a `chatzeo serve` (or plain ``runzeo``) on a free port, default or TLS,
with a short transaction-timeout.
"""

from __future__ import annotations

import os
import pickle
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from support import REPO
from ZEO.ClientStorage import ClientStorage
from ZODB.utils import z64

from chatzeo.testing import Pki, ServerProcess, chatzeo_command

# Long enough that a `chatzeo send` started while the lock is held reaches its vote
# before the timeout frees the lock, even on a loaded 2-core machine.
TRANSACTION_TIMEOUT = 10


class Served(ServerProcess):
    """A server for these tests, with the short `TRANSACTION_TIMEOUT`: ``tls`` with
    ``pki`` (certificates by name), ``plain`` for ZEO's own runzeo (the control: what
    the attack does without chatzeo)."""

    def __init__(
        self, data_dir: Path, *, pki: Pki | None = None, plain: bool = False,
        options: tuple[str, ...] = (),
    ) -> None:
        self.plain = plain
        super().__init__(data_dir, options=options, pki=pki, runzeo=plain,
                         transaction_timeout=TRANSACTION_TIMEOUT)


def cli(*args: str, timeout: float = 120) -> tuple[int, str, str, float]:
    """Run ``chatzeo ARGS``; exit status, stdout, stderr and seconds taken."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("CHATZEO_SERVER", "CHATZEO_TLS"))}
    started = time.monotonic()
    result = subprocess.run(chatzeo_command(*args), capture_output=True, timeout=timeout,
                            env=env, cwd=REPO)
    return (result.returncode, result.stdout.decode(), result.stderr.decode(),
            time.monotonic() - started)


class RawClient:
    """A ZEO connection for sending raw calls (see the module docstring)."""

    def __init__(self, server: Served, name: str = "alice") -> None:
        self.storage = ClientStorage(
            ("127.0.0.1", server.port), wait_timeout=30,
            ssl=server.context(name), ssl_server_hostname=None,
        )
        self._ids = iter(range(1_000_000, 2_000_000))

    def call(self, method: str, *args: Any) -> Any:
        return self.storage._call(method, *args)

    def cast(self, method: str, *args: Any) -> None:
        self.storage._async(method, *args)

    def new_oid(self) -> bytes:
        oid: bytes = self.call("new_oids", 1)[0]
        return oid

    def begin(self, user: Any = b"", description: Any = b"", ext: Any = None,
              tid: Any = None, status: Any = " ") -> int:
        txn = next(self._ids)
        self.cast("tpc_begin", txn, user, description, {} if ext is None else ext, tid, status)
        return txn

    def store(self, txn: int, data: bytes, oid: bytes | None = None,
              serial: bytes = z64) -> bytes:
        oid = oid or self.new_oid()
        self.cast("storea", oid, serial, data, txn)
        return oid

    def vote(self, txn: int) -> Any:
        return self.call("vote", txn)

    def finish(self, txn: int) -> Any:
        return self.call("tpc_finish", txn)

    def abort(self, txn: int) -> None:
        self.call("tpc_abort", txn)

    def last_transaction(self) -> bytes:
        tid: bytes = self.call("lastTransaction")
        return tid

    def close(self) -> None:
        self.storage.close()


def persistent_record(value: Any) -> bytes:
    """A record as ZODB stores one: the class pickle, then the state pickle."""
    return pickle.dumps((dict, None), 3) + pickle.dumps(value, 3)


def raw_socket(server: Served, name: str = "alice") -> socket.socket:
    """A connection that has done ZEO's handshake and nothing else."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    context = server.context(name)
    if context is not None:
        sock = context.wrap_socket(sock)
    size = struct.unpack(">I", _read(sock, 4))[0]
    _read(sock, size)  # the server's protocol, e.g. b"Z5"
    send_frame(sock, b"Z5")
    return sock


def send_frame(sock: socket.socket, message: bytes) -> None:
    sock.sendall(struct.pack(">I", len(message)) + message)


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    return data


def closed_by_peer(sock: socket.socket, timeout: float = 15.0) -> bool:
    """True once the server has closed ``sock`` (reading returns EOF or fails)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True
    return True


__all__: list[str] = ["Served", "RawClient", "cli", "raw_socket", "send_frame", "closed_by_peer",
           "persistent_record", "TRANSACTION_TIMEOUT"]


class ExecPayload:
    """Pickles as ``builtins.exec`` of code that writes the loading process's pid into
    ``marker``: the one module ZEO's own server decoder lets a message name."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import builtins

        code = f"open({str(self.marker)!r}, 'w').write(str(__import__('os').getpid()))"
        return (builtins.exec, (code,))


__all__ += ["ExecPayload"]
