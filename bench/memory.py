"""Memory: peak RSS of a fresh client process that opens a big room through ZEO and
shows its latest 50 messages (chatzeo), or joins it as the seed's client does (its
first ``new_messages``, the whole history).

`measure` runs ``python -m bench.memory`` as a subprocess (so nothing the benchmark
loaded counts) and reads one JSON line from it. The child's main thread does it all.

The peak is the child's ``VmHWM`` (/proc/self/status), not ``getrusage().ru_maxrss``:
Linux carries ``ru_maxrss`` across ``execve``, so a child started by the benchmark
would report at least the benchmark's own size (seen here: 63 MB before it did anything).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

__all__ = ["MemoryResult", "measure"]


@dataclass
class MemoryResult:
    system: str
    size: int
    peak_mb: float
    baseline_mb: float  # after imports, before opening anything
    seconds: float
    shown: int


def _peak_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def _child(system: str, address: str, room: str) -> dict[str, float]:
    from chatzeo.client import ChatClient
    from chatzeo.database import open_db

    from .peers import seed_db
    from .seed import seed_room

    baseline = _peak_mb()
    started = time.perf_counter()
    if system == "chatzeo":
        db = open_db(address)
        client = ChatClient(db)
        shown = len(client.join(room, history=50))
        seconds = time.perf_counter() - started
        client.close()
    else:
        db = seed_db(address)
        connection = db.open()
        shown = len(seed_room(connection, room).new_messages()[-50:])
        seconds = time.perf_counter() - started
        connection.close()
    db.close()
    return {"peak_mb": _peak_mb(), "baseline_mb": baseline, "seconds": seconds, "shown": shown}


def measure(system: str, address: str, room: str, size: int, timeout: float) -> MemoryResult:
    """Run the child for ``system`` ("chatzeo" or "seed") against ``room`` at ``address``."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench.memory", system, address, room],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ), check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory child failed: {completed.stderr[-2000:]}")
    data = json.loads(completed.stdout.strip().splitlines()[-1])
    return MemoryResult(system, size, data["peak_mb"], data["baseline_mb"], data["seconds"],
                        int(data["shown"]))


if __name__ == "__main__":
    print(json.dumps(_child(*sys.argv[1:4])))
