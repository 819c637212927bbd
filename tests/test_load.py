"""A short load run (scripts/load.py): 12 writer and 8 reader processes on a real server
for an 8-second window that opens once every writer has connected (so a loaded machine,
where starting them can take longer than the window, still runs it; on a quiet one the
whole run takes no longer than the 10 seconds from the writers' start it used to);
every writer sends, nothing lost, nothing duplicated, every reader sees the stored order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_short_load_run(tmp_path: Path) -> None:
    report_file = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "load.py"), "--seconds", "8",
         "--writers", "12", "--readers", "8", "--json", str(report_file)],
        capture_output=True, timeout=380,
    )
    print(result.stdout.decode())
    assert result.returncode == 0, (result.stdout.decode(), result.stderr.decode()[-3000:])
    report = json.loads(report_file.read_text())
    assert report["messages"] > 0 and report["lost"] == 0 and report["duplicated"] == 0
    assert report["writers_that_sent"] == 12, "a writer sent nothing in the window"
    assert report["readers_in_stored_order"] == 8 and report["check"] == "ok"
    assert report["rss_kib"], "the server's memory was sampled"
