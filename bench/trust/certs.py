"""A throwaway certificate authority for TLS tests and benchmarks (the openssl CLI).

`make_pki` writes a CA, a server certificate for 127.0.0.1 and one client
certificate per name (subject ``CN=<name>``), and returns their paths; `server_conf`
writes a ``chatzeo serve`` config that requires them; `client_context` is what a
client passes to `chatzeo.open_db(..., ssl=...)`. Runs in the calling thread.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pki", "make_pki", "server_conf", "client_context"]

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
    directory: Path
    ca: Path

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"


def _openssl(*args: str | Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], check=True, capture_output=True, timeout=30
    )


def make_pki(directory: Path, clients: tuple[str, ...] = ("alice", "bob")) -> Pki:
    """A CA in ``directory`` that signed ``server`` and one certificate per client name."""
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


def server_conf(pki: Pki, path: Path) -> Path:
    """Write a `chatzeo serve` config at ``path`` that requires a client certificate."""
    path.write_text(
        f"""%define DATA_DIR var
<zeo>
  address 127.0.0.1:8765
  invalidation-queue-size 10000
  transaction-timeout 30
  <ssl>
    certificate {pki.cert("server")}
    key {pki.key("server")}
    authenticate {pki.ca}
  </ssl>
</zeo>
<filestorage 1>
  path $DATA_DIR/chat.fs
</filestorage>
"""
    )
    return path


def client_context(pki: Pki, name: str) -> ssl.SSLContext:
    """A client context presenting ``name``'s certificate and trusting only the CA."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.check_hostname = False  # the CA is trusted for this one server only
    context.load_cert_chain(str(pki.cert(name)), str(pki.key(name)))
    return context
