"""TLS for clients of a ZEO server that requires client certificates (docs/security.md).

`client_context` builds the `ssl.SSLContext` that `open_db(..., ssl=...)` passes to
ZEO: it proves who the client is with its certificate and key, and trusts only the
given CA for the server's certificate. `context_from_options` is the command line's
view: ``--tls-cert/--tls-key/--tls-ca`` or ``$CHATZEO_TLS_CERT/_KEY/_CA``.

Identity files (``chatzeo invite`` writes them: `chatzeo.server.identity`)
    `load_identity` reads one and returns its name (the certificate's commonName),
    the server address it names (if any) and an `ssl.SSLContext` that presents the
    certificate and trusts only that CA. The server's certificate is checked
    against that CA alone, not against a host name: the CA is this one server's
    own, so any certificate it signed for a server is this server's
    (`ssl.SSLContext.check_hostname` is off for that reason, and only then).
    `default_identity_path` is ``$CHATZEO_IDENTITY``, else
    ``$XDG_CONFIG_HOME/chatzeo/identity.chatzeo``.

Runs in the calling thread.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from .errors import InvalidInput

__all__ = [
    "client_context",
    "context_from_options",
    "TLS_ENVIRONMENT",
    "Identity",
    "load_identity",
    "default_identity_path",
    "IDENTITY_SUFFIX",
    "IDENTITY_HEADER",
]

IDENTITY_SUFFIX = ".chatzeo"
# The first line of every identity file.
IDENTITY_HEADER = "# chatzeo identity"

TLS_ENVIRONMENT = {"cert": "CHATZEO_TLS_CERT", "key": "CHATZEO_TLS_KEY", "ca": "CHATZEO_TLS_CA"}


def client_context(cert: str, key: str | None, ca: str) -> ssl.SSLContext:
    """A client context presenting ``cert``/``key`` and trusting only ``ca``.

    The server's certificate must name the host the client dials (e.g. an IP SAN
    of 127.0.0.1). Raises `InvalidInput` naming the file that cannot be used.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as error:
        raise InvalidInput(f"cannot use TLS CA file {ca}: {error}") from None
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise InvalidInput(f"cannot use TLS certificate {cert}: {error}") from None
    return context


def context_from_options(
    cert: str | None, key: str | None, ca: str | None
) -> ssl.SSLContext | None:
    """The context the options (or their environment variables) ask for, or None.

    A certificate without a CA (or the reverse) is refused with `InvalidInput`.
    """
    cert = cert or os.environ.get(TLS_ENVIRONMENT["cert"]) or None
    key = key or os.environ.get(TLS_ENVIRONMENT["key"]) or None
    ca = ca or os.environ.get(TLS_ENVIRONMENT["ca"]) or None
    if cert is None and ca is None and key is None:
        return None
    if cert is None or ca is None:
        raise InvalidInput("TLS needs both --tls-cert and --tls-ca (or CHATZEO_TLS_CERT/_CA)")
    return client_context(cert, key, ca)


@dataclass(frozen=True)
class Identity:
    """What an identity file holds, ready to connect with."""

    name: str
    server: str | None
    context: ssl.SSLContext
    path: Path


def default_identity_path() -> Path:
    """``$CHATZEO_IDENTITY``, else ``$XDG_CONFIG_HOME/chatzeo/identity.chatzeo``."""
    explicit = os.environ.get("CHATZEO_IDENTITY")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "chatzeo" / f"identity{IDENTITY_SUFFIX}"


_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)
_SERVER = re.compile(rb"^# server: (\S+)\s*$", re.MULTILINE)


def load_identity(path: Path) -> Identity:
    """Read an identity file (`chatzeo.server.identity.issue` makes them); raises
    `InvalidInput` naming what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
        mode = os.stat(path).st_mode
    except OSError as error:
        raise InvalidInput(f"cannot read identity file {path}: {error.strerror}") from None
    if mode & 0o077:
        raise InvalidInput(
            f"identity file {path} can be read by others (mode {mode & 0o777:o}); "
            f"chmod 600 {path}"
        )
    blocks = [(m.group(1).decode(), m.group(0)) for m in _BLOCK.finditer(data)]
    certs = [block for kind, block in blocks if kind == "CERTIFICATE"]
    keys = [block for kind, block in blocks if kind.endswith("PRIVATE KEY")]
    if len(certs) != 2 or len(keys) != 1:
        raise InvalidInput(
            f"{path} is not a chatzeo identity file (one key, its certificate and the CA)"
        )
    try:
        cert = x509.load_pem_x509_certificate(certs[0])
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as error:
        raise InvalidInput(f"{path}: the certificate cannot be read ({error})") from None
    if len(names) != 1:
        raise InvalidInput(f"{path}: the certificate names no single user")
    name = str(names[0].value)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.load_verify_locations(cadata=certs[1].decode("ascii"))
    # Trusting only this server's own CA pins the server; see the module docstring.
    context.check_hostname = False
    try:
        context.load_cert_chain(str(path))
    except ssl.SSLError as error:
        raise InvalidInput(f"{path}: the key does not fit its certificate ({error})") from None
    server = _SERVER.search(data)
    return Identity(name, server.group(1).decode() if server else None, context, path)
