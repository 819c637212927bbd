"""The server wing: what `chatzeo serve` runs around ZEO's `StorageServer`.

- `serve`: the ``chatzeo serve`` entry point; builds the server from the parts below.
- `protocol`: which ZEO calls a client may make, frame and record limits, and the
  connection's certificate and its name (read there once, for every part below).
- `guard`: the per-connection handler that hands each commit to the rules.
- `rules`: the commit rules (`check_commit`, one `CommitRules` method per rule).
- `index`: the role and owner of every object of chatzeo's graph (`TrustIndex`).
- `decoding`: stored records read as plain data, without running any of their code.
- `readguard`: private rooms served to their members only; revoked certificates.
- `fanout`: invalidations sent only to the connections holding what changed.
- `identity`: the server's own CA, users' identity files, revocation lists.

Imports run downward only: these modules use the core (``chatzeo/*.py``), never
``chatzeo.terminal`` or ``chatzeo.cli``, and the core never imports them.
"""
