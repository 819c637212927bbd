"""Identity: a server's own certificate authority, users' identity files, revocation.

Server side (the operator, next to the server's data directory)
    `ensure_authority` creates, on first use, ``DATA_DIR/tls/``: a CA key and
    certificate (``ca.key`` mode 0600, ``ca.pem``) and a server key and certificate
    signed by it (valid for 127.0.0.1, ::1, localhost, this host's name and any host
    given). `server_context` is the TLS context `chatzeo serve --tls auto` listens
    with: it requires a client certificate signed by that CA.
    `issue` signs a new key for one user name and returns the *identity file*: the
    user's private key, certificate and the CA certificate, PEM, in one text, which
    `save_identity` writes (mode 0600, never over an existing file); every
    certificate issued is recorded by serial in
    ``tls/issued.json``. `revoke` adds every certificate issued to a name to
    ``tls/revoked.json``; `Revocations` is the server's view of that file, re-read
    when its modification time or size changes.

The client side (reading an identity file to connect with) is `chatzeo.tls`.

Everything runs in the calling thread; files are written whole through a temporary
file and a rename, so a crash never leaves half of one.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import socket
import ssl
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import IdentityError
from ..tls import IDENTITY_HEADER
from ..validation import check_user_name

__all__ = [
    "Authority",
    "IdentityError",
    "Revocations",
    "ensure_authority",
    "issue",
    "revoke",
    "save_identity",
    "server_context",
]

# Certificates are long-lived: a user's is revoked, not left to expire.
CA_DAYS = 3650
LEAF_DAYS = 825


@dataclass(frozen=True)
class Authority:
    """The files of a server's own CA under ``directory`` (``DATA_DIR/tls``)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def issued(self) -> Path:
        return self.directory / "issued.json"

    @property
    def revoked(self) -> Path:
        return self.directory / "revoked.json"

    def exists(self) -> bool:
        return self.ca_cert.is_file() and self.ca_key.is_file()


def _write(path: Path, data: bytes, mode: int = 0o600, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` whole (temporary file + rename), with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if exclusive and path.exists():
        raise IdentityError(f"{path} exists already; remove it first or choose another file")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if exclusive:
            os.link(temporary, path)  # fails if another writer got there first
            os.unlink(temporary)
        else:
            os.replace(temporary, path)
    except FileExistsError:
        os.unlink(temporary)
        raise IdentityError(f"{path} exists already") from None
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save_identity(path: Path, text: bytes) -> None:
    """Write the identity file ``text`` (from `issue`) to ``path``, mode 0600, whole.

    Raises `IdentityError` if ``path`` exists (also if another writer creates it
    meanwhile): an identity file holds a private key, so none is ever replaced.
    """
    _write(Path(path), text, 0o600, exclusive=True)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def ensure_authority(directory: Path, hosts: Iterable[str] = ()) -> Authority:
    """The CA and server certificate in ``directory``, created if missing.

    ``hosts`` are extra names or addresses the server certificate is valid for.
    An existing CA is kept (its users' identity files stay valid); a missing
    server certificate is made again from it.
    """
    authority = Authority(Path(directory))
    authority.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(authority.directory, 0o700)
    if not authority.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(
            NameOID.COMMON_NAME, f"chatzeo CA {socket.gethostname()[:40]}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        _write(authority.ca_key, _key_pem(key))
        _write(authority.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        for stale in (authority.server_cert, authority.server_key):
            stale.unlink(missing_ok=True)
    if not (authority.server_cert.is_file() and authority.server_key.is_file()):
        names = ["127.0.0.1", "::1", "localhost", socket.gethostname(), *hosts]
        key, pem = _sign(authority, "chatzeo server", names, server=True)
        _write(authority.server_key, _key_pem(key))
        _write(authority.server_cert, pem, 0o644)
    return authority


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _sign(
    authority: Authority, common_name: str, hosts: Iterable[str] = (), server: bool = False
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A new key and a certificate for it signed by ``authority``: (key, cert PEM)."""
    try:
        ca_key = serialization.load_pem_private_key(authority.ca_key.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(authority.ca_cert.read_bytes())
    except (OSError, ValueError) as error:
        raise IdentityError(f"cannot use the CA in {authority.directory}: {error}") from None
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
    )
    alternative: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if host and host.isascii():
                alternative.append(x509.DNSName(host))
    if alternative:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return key, cert.public_bytes(serialization.Encoding.PEM)


def server_context(authority: Authority) -> ssl.SSLContext:
    """The listening context of `chatzeo serve --tls auto`: present the server
    certificate, require a client certificate signed by the CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(authority.ca_cert))
    context.load_cert_chain(str(authority.server_cert), str(authority.server_key))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


# -- issuing and revoking -------------------------------------------------------


def _read_json(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise IdentityError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(s, str) for s in v)
        for k, v in data.items()
    ):
        raise IdentityError(f"{path} is not a name -> serials mapping")
    return data


def _write_json(path: Path, data: dict[str, list[str]]) -> None:
    _write(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), 0o600)


def issue(authority: Authority, name: str, server: str | None = None) -> tuple[bytes, str]:
    """A new identity file for user ``name``, and its certificate's serial (hex).

    ``server`` (``host:port``), if given, is written into the file so that clients
    need no ``--server``. Issuing again for a name adds a certificate; the old
    ones stay valid until `revoke`.
    """
    name = check_user_name(name)
    if not authority.exists():
        raise IdentityError(
            f"no certificate authority in {authority.directory}: "
            "start the server once with 'chatzeo serve --tls auto'"
        )
    key, pem = _sign(authority, name)
    serial = f"{x509.load_pem_x509_certificate(pem).serial_number:x}"
    issued = _read_json(authority.issued)
    issued.setdefault(name, []).append(serial)
    revoked = _read_json(authority.revoked)
    if serial in revoked.get(name, []):  # pragma: no cover - random 159-bit serials
        raise IdentityError("a fresh serial is on the revocation list; try again")
    lines = [f"{IDENTITY_HEADER} for {name}"]
    if server:
        lines.append(f"# server: {server}")
    text = "\n".join(lines).encode() + b"\n" + _key_pem(key) + pem + authority.ca_cert.read_bytes()
    _write_json(authority.issued, issued)
    return text, serial


def revoke(authority: Authority, name: str) -> list[str]:
    """Put every certificate issued to ``name`` on the revocation list; return their
    serials (those not revoked before). Raises `IdentityError` for a name never issued."""
    name = check_user_name(name)
    issued = _read_json(authority.issued).get(name, [])
    if not issued:
        raise IdentityError(f"no certificate was issued to {name!r} by {authority.directory}")
    revoked = _read_json(authority.revoked)
    before = set(revoked.get(name, []))
    fresh = [serial for serial in issued if serial not in before]
    revoked[name] = sorted(before | set(issued))
    _write_json(authority.revoked, revoked)
    return fresh


class Revocations:
    """The revocation list as the server sees it; `refresh` re-reads it when changed.

    Serials are compared as integers (``getpeercert`` writes them in upper-case hex).
    Runs in the server's event-loop thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.serials: frozenset[int] = frozenset()
        self._seen: tuple[int, int] | None = None

    def refresh(self) -> bool:
        """Re-read the file if it changed; True if the set of serials grew or shrank."""
        try:
            status = os.stat(self.path)
            seen = (status.st_mtime_ns, status.st_size)
        except FileNotFoundError:
            seen = (0, 0)
        if seen == self._seen:
            return False
        self._seen = seen
        if seen == (0, 0):
            serials: frozenset[int] = frozenset()
        else:
            # A list that cannot be read keeps the previous one: revocations only
            # grow, and an operator's half-edited file must not un-revoke anybody.
            try:
                data = _read_json(self.path)
            except IdentityError:
                return False
            serials = frozenset(int(s, 16) for values in data.values() for s in values
                                if re.fullmatch(r"[0-9a-fA-F]{1,64}", s))
        changed = serials != self.serials
        self.serials = serials
        return changed

    def is_revoked(self, peercert: dict[str, object] | None) -> bool:
        serial = (peercert or {}).get("serialNumber")
        try:
            return isinstance(serial, str) and int(serial, 16) in self.serials
        except ValueError:
            return True
