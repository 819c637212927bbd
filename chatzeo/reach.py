"""Reaching a server from the command line: say why it does not answer, not only that.

ZEO's client retries in silence until its wait runs out and then knows only that no
server answered. Before a command opens a ZEO client, `wait_for_server` asks the
address itself, as ZEO's own ``ruok`` check does: connect, take the TLS handshake if
there is one, read the server's protocol greeting, send ``ruok``, read the answer
(the server then closes the connection itself, so its log shows no error). What went
wrong becomes one specific error:

`NothingListens`      connection refused (or no answer) until ``wait`` ran out: a
                      server that is starting is still waited for
`HostNotFound`        the host name does not resolve (at once: waiting cannot help)
`CertificateRefused`  the server refused this client's certificate, or wants one
`ServerNotTrusted`    the server's certificate is not signed by the ``--tls-ca``
`NotAZEOServer`       something answered, but not as a ZEO server (or it needs TLS)

`open_for_command` is what every client command calls: the probe for a ZEO address,
then `chatzeo.database.open_db`, with the storage errors a user can cause (a data
file's directory missing, a data file a running server holds) as one-line errors.

Runs in the calling thread.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl as ssl_module
import struct
import time
from collections.abc import Callable
from typing import Any

import zc.lockfile

from .database import open_db, parse_address
from .errors import (
    CertificateRefused,
    ChatError,
    InvalidTarget,
    NotAZEOServer,
    ServerNotTrusted,
    ServerUnavailable,
)

__all__ = [
    "wait_for_server",
    "probe",
    "open_for_command",
    "is_server_address",
    "NothingListens",
    "HostNotFound",
    "CertificateRefused",
    "ServerNotTrusted",
    "NotAZEOServer",
]

# One attempt's bound: a server that accepted the connection greets at once.
ATTEMPT_TIMEOUT = 3.0
RETRY_DELAY = 0.2


class NothingListens(ServerUnavailable):
    """No server answered at the address within the wait bound (refused, no answer)."""

    def __init__(self, address: str, seconds: float, reason: str):
        super().__init__(address, seconds)
        self.reason = reason
        if reason == "connection refused":
            shown = f"nothing listens at {address} (waited {seconds:g}s)"
        else:
            shown = f"no server answered at {address}: {reason} (waited {seconds:g}s)"
        self.args = (shown,)


class HostNotFound(InvalidTarget):
    """The host of a ``host:port`` address does not resolve."""

    def __init__(self, target: str, host: str):
        super().__init__(target, "name not found")
        self.host = host
        self.args = (f"cannot reach {target}: host {host!r} not found",)


def is_server_address(target: str | None) -> bool:
    """Whether ``target`` names a ZEO server (``host:port`` or a socket path)."""
    if target is None or "://" in target or target.endswith(".conf"):
        return False
    if os.path.isfile(target):
        return False
    try:
        parse_address(target)
    except InvalidTarget:
        return False
    return True


def probe(target: str, ssl: ssl_module.SSLContext | None = None,
          timeout: float = ATTEMPT_TIMEOUT, cert: str | None = None) -> dict[str, Any]:
    """One attempt at the server ``target`` names; its ``ruok`` status on success.

    Raises `HostNotFound`, `CertificateRefused`, `ServerNotTrusted` or
    `NotAZEOServer` for what waiting cannot mend, and `OSError` (refused, timed
    out, reset) for what a server that is starting would mend. ``cert``, the
    client certificate's file, lets a refusal say what is wrong with it.
    """
    address = parse_address(target)
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where: Any = address
        hostname = None
    else:
        host, port = address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            if error.errno == socket.EAI_AGAIN:
                raise OSError(errno.EAGAIN, "the name server did not answer") from None
            raise HostNotFound(target, host) from None
        family, _, _, _, where = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        hostname = host
    sock.settimeout(timeout)
    try:
        sock.connect(where)
        if ssl is not None:
            sock = _handshake(sock, ssl, hostname, target)
        greeting = _receive(sock, target, ssl is not None, cert)
        if greeting[:1] not in (b"Z", b"M"):
            raise NotAZEOServer(target, f"it greeted with {greeting[:20]!r}")
        sock.sendall(struct.pack(">I", 4) + b"ruok")
        answer = _receive(sock, target, ssl is not None, cert)
        try:
            status: dict[str, Any] = json.loads(answer)
        except ValueError:
            status = {}
        return status
    finally:
        sock.close()


def _handshake(sock: socket.socket, context: ssl_module.SSLContext, hostname: str | None,
               target: str) -> socket.socket:
    try:
        return context.wrap_socket(sock, server_hostname=hostname)
    except ssl_module.SSLCertVerificationError as error:
        raise ServerNotTrusted(target, error.verify_message or str(error)) from None
    except ssl_module.SSLError as error:
        raise CertificateRefused(target, _alert(error)) from None


def _receive(sock: socket.socket, target: str, tls: bool, cert: str | None) -> bytes:
    """One of ZEO's sized messages (a 4-byte big-endian length, then the bytes)."""
    try:
        header = _exactly(sock, 4)
        (size,) = struct.unpack(">I", header)
        if size > 1 << 16:
            raise NotAZEOServer(target, f"its first message claims {size} bytes")
        return _exactly(sock, size)
    except ssl_module.SSLError as error:
        # With TLS 1.3 the server judges the client's certificate after the
        # handshake has completed on this side: its refusal arrives as an alert here.
        raise CertificateRefused(target, _alert(error)) from None
    except (ConnectionResetError, EOFError) as error:
        if tls:
            # With TLS 1.3 the server judges the client's certificate after this
            # side's handshake is done; Python's server then closes without an alert.
            raise CertificateRefused(target, _what_is_wrong(cert)) from error
        raise NotAZEOServer(target, "it hung up") from None
    except TimeoutError as error:
        hint = "" if tls else "; does it need TLS (--tls-cert, --tls-key, --tls-ca)?"
        what = "it said nothing" if isinstance(error, TimeoutError) else "it hung up"
        raise NotAZEOServer(target, f"{what}{hint}") from None


def _what_is_wrong(cert: str | None) -> str:
    """Why a server may have refused the certificate in ``cert``, read from the
    certificate itself (the server does not say)."""
    generic = "it closed the connection after the TLS handshake"
    if cert is None:
        return generic
    try:
        # The stdlib's only certificate parser; private, hence the fallback.
        decoded = ssl_module._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]
        expires = ssl_module.cert_time_to_seconds(decoded["notAfter"])
        starts = ssl_module.cert_time_to_seconds(decoded["notBefore"])
    except Exception:
        return generic
    if expires < time.time():
        return f"it expired on {decoded['notAfter']}"
    if starts > time.time():
        return f"it is not valid before {decoded['notBefore']}"
    if decoded.get("issuer") == decoded.get("subject"):
        return "it is self-signed, not signed by a CA the server trusts"
    return "it is not signed by a CA the server trusts"


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _alert(error: ssl_module.SSLError) -> str:
    # "tlsv1 alert unknown ca", "sslv3 alert certificate expired", ...: the reason
    # names what the server objected to; without one the message is all there is.
    reason = (error.reason or "").lower().replace("_", " ")
    replies = {
        "tlsv1 alert unknown ca": "signed by a CA it does not trust",
        "sslv3 alert certificate expired": "the certificate has expired",
        "sslv3 alert bad certificate": "it does not accept the certificate",
        "tlsv13 alert certificate required": "it requires a client certificate",
        "sslv3 alert handshake failure": "the TLS handshake failed",
        "wrong version number": "it does not speak TLS on this port",
    }
    return replies.get(reason, reason or " ".join(str(error).split()))


def wait_for_server(target: str, ssl: ssl_module.SSLContext | None, wait: float,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep,
                    cert: str | None = None) -> float:
    """Probe ``target`` until its server answers or ``wait`` seconds pass; return
    the seconds left. Errors that waiting cannot mend are raised at once; a refused
    or unanswered connection is retried, then raised as `NothingListens`."""
    started = clock()
    deadline = started + wait
    while True:
        left = deadline - clock()
        try:
            probe(target, ssl, timeout=max(0.5, min(ATTEMPT_TIMEOUT, left)), cert=cert)
            return max(0.0, deadline - clock())
        except OSError as error:
            reason = _why(error)
        if clock() + RETRY_DELAY >= deadline:
            raise NothingListens(target, wait, reason)
        sleep(RETRY_DELAY)


def _why(error: OSError) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError):
        return "no answer"
    if isinstance(error, FileNotFoundError):
        return "no such socket"
    return (error.strerror or str(error)).lower()


def open_for_command(target: str | None, wait: float,
                     ssl: ssl_module.SSLContext | None = None, cert: str | None = None) -> Any:
    """Open ``target`` for a command: see the module docstring. Raises `ChatError`s
    with one line for the user."""
    if target is not None and is_server_address(target):
        left = wait_for_server(target, ssl, wait, cert=cert)
        # The server answered just now; give ZEO's own connection a moment even
        # when the probe used up the bound.
        wait = max(left, min(wait, 1.0), 0.5)
    try:
        return open_db(target, wait=wait, ssl=ssl)
    except zc.lockfile.LockError:
        raise ChatError(
            f"{target} is locked: a server (or another program) has it open; "
            "connect to that server's address instead"
        ) from None
    except FileNotFoundError as error:
        where = error.filename or target
        raise ChatError(f"cannot open {target}: no such directory or file: {where}") from None
    except PermissionError as error:
        raise ChatError(f"cannot open {target}: permission denied: {error.filename}") from None
    except IsADirectoryError as error:
        raise ChatError(f"cannot open {target}: is a directory: {error.filename}") from None
