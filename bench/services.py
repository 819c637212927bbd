"""The redis-server a benchmark run starts beside chatzeo's (the ZEO server is
`chatzeo.testing.ServerProcess`), on a free 127.0.0.1 port.

Everything here runs in the benchmark's main process and thread.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Self

from chatzeo.testing import free_port, wait_until

__all__ = ["RedisServer"]


class RedisServer:
    """A redis-server of its own; ``fsync=True`` appends and fsyncs every write (the
    like-for-like peer of FileStorage), ``False`` keeps everything in memory. Its
    output goes to ``directory/redis.log``; a context manager stops it."""

    def __init__(self, directory: Path, fsync: bool) -> None:
        self.directory = directory
        self.fsync = fsync
        self.port = free_port()
        self.log = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def _command(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.fsync
            else ["--appendonly", "no"]
        )
        return [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
            "--save", "", "--dir", str(self.directory), *persistence,
        ]

    def start(self, timeout: float = 30.0) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
            )
        try:
            wait_until(f"redis on port {self.port}", self._answers, timeout)
        except BaseException:  # one that never answered must not be left running
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis exited: {self.log.read_text()[-2000:]}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
