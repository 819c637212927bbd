"""TLS for clients of a ZEO server that requires client certificates (docs/security.md).

`client_context` builds the `ssl.SSLContext` that `open_db(..., ssl=...)` passes to
ZEO: it proves who the client is with its certificate and key, and trusts only the
given CA for the server's certificate. `context_from_options` is the command line's
view: ``--tls-cert/--tls-key/--tls-ca`` or ``$CHATZEO_TLS_CERT/_KEY/_CA``.
Runs in the calling thread.
"""

from __future__ import annotations

import os
import ssl

from .errors import InvalidInput

__all__ = ["client_context", "context_from_options", "TLS_ENVIRONMENT"]

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
