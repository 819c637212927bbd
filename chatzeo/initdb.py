"""``chatzeo init-db TARGET``: prepare a database for chatzeo; safe to run again.

On PostgreSQL (RelStorage) it creates RelStorage's history-free schema (RelStorage
does so when it opens a database that has none), chatzeo's root objects, and the
NOTIFY trigger clients are pushed through (`chatzeo.postgres`). On any other target
(ZEO server, FileStorage) it creates the root objects only, which `chatzeo serve`
also does. Every step checks what is there first, so a second run changes nothing.

Runs in the calling thread.
"""

from __future__ import annotations

import os

from . import postgres
from .database import DEFAULT_WAIT, open_db
from .realm import get_root
from .retry import run_in_transaction

__all__ = ["init_db"]


def init_db(target: str | os.PathLike[str] | None, *, wait: float = DEFAULT_WAIT) -> list[str]:
    """Prepare the database ``target`` names; returns what it found or did, one line each.

    Raises what `chatzeo.open_db` raises, and `DatabaseNotPrepared` for a
    PostgreSQL database whose RelStorage schema keeps history.
    """
    db = open_db(target, wait=wait)
    try:
        done = [f"storage ready: {db.storage.getName()}"]
        run_in_transaction(db, get_root, what="creating chatzeo's root")
        done.append("chatzeo root objects ready")
        dsn = postgres.dsn_of(db.storage)
        if dsn is not None:
            postgres.install_trigger(dsn)
            done.append(
                "NOTIFY trigger on object_state ready (a channel per object, "
                f"{postgres.CHANNEL}_<oid>)"
            )
        return done
    finally:
        db.close()
