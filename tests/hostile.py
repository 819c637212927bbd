"""What a hostile client stores: objects whose pickles run a shell command when loaded.

`Payload` pickles as a call of ``os.system`` (the pickle names the global
``posix.system``); the command writes the loading process's pid into ``marker``, so a
test can tell whether it ran and in which process. `Trojan` is a persistent class
chatzeo does not know, stored as a record of its own.
"""

from __future__ import annotations

import os
from typing import Any

from persistent import Persistent


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        # $PPID: the shell's parent, i.e. the process that unpickled the payload.
        return (os.system, (f"echo $PPID > {self.marker}",))


class Trojan(Persistent):
    def __init__(self, marker: str) -> None:
        self.payload = Payload(marker)
