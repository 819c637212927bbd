"""A short load run (scripts/load.py): 12 writer and 8 reader processes for 10 seconds on a
real server; nothing lost, nothing duplicated, every reader sees the stored order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_short_load_run(tmp_path: Path) -> None:
    report_file = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "load.py"), "--seconds", "10",
         "--writers", "12", "--readers", "8", "--json", str(report_file)],
        capture_output=True, timeout=380,
    )
    print(result.stdout.decode())
    assert result.returncode == 0, (result.stdout.decode(), result.stderr.decode()[-3000:])
    report = json.loads(report_file.read_text())
    assert report["messages"] > 0 and report["lost"] == 0 and report["duplicated"] == 0
    assert report["readers_in_stored_order"] == 8 and report["check"] == "ok"
    assert report["rss_kib"], "the server's memory was sampled"
