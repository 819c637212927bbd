"""The redis-server a benchmark run starts beside chatzeo's (the ZEO server is
`chatzeo.testing.ServerProcess`), on a free 127.0.0.1 port.

Everything here runs in the benchmark's main process and thread.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from chatzeo.testing import ServerProcess

__all__ = ["RedisServer"]


class RedisServer(ServerProcess):
    """A redis-server of its own, started, waited for and stopped as `ServerProcess`
    does; ``fsync=True`` appends and fsyncs every write (the like-for-like peer of
    FileStorage), ``False`` keeps everything in memory."""

    def __init__(self, directory: Path, fsync: bool) -> None:
        super().__init__(directory)
        self.fsync = fsync

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def command(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.fsync
            else ["--appendonly", "no"]
        )
        return [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
            "--save", "", "--dir", str(self.data_dir), *persistence,
        ]
