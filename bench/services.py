"""The servers a benchmark run starts and stops: a `chatzeo serve` ZEO server and a
redis-server, each on a free 127.0.0.1 port, and the helpers to wait for them.

Everything here runs in the benchmark's main process and thread.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

__all__ = ["ZeoServer", "RedisServer", "free_port", "wait_until", "REPO", "ZEO_CONF"]

REPO = Path(__file__).resolve().parent.parent
ZEO_CONF = REPO / "zeo.conf"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(label: str, condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``condition`` until it returns something truthy; `TimeoutError` after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {label}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class _Process:
    """A server subprocess listening on ``port``; its output goes to ``log``."""

    name = "server"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.log = directory / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
            )
        try:
            wait_until(f"{self.name} on port {self.port}", self._answers, timeout)
        except BaseException:  # one that never answered must not be left running
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
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


class ZeoServer(_Process):
    """``chatzeo serve`` with the repo's zeo.conf, as users start it; ``data_dir`` holds chat.fs."""

    name = "zeo"

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.address = f"127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [
            sys.executable, "-m", "chatzeo", "serve",
            "--config", str(ZEO_CONF),
            "--address", self.address,
            "--data-dir", str(self.directory),
        ]


class RedisServer(_Process):
    """A redis-server of its own; ``fsync=True`` appends and fsyncs every write (the
    like-for-like peer of FileStorage), ``False`` keeps everything in memory."""

    name = "redis"

    def __init__(self, directory: Path, fsync: bool) -> None:
        super().__init__(directory)
        self.fsync = fsync

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
