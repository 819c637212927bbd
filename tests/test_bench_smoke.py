"""The benchmark's quick mode runs to the end and loses no message.

Speed is never asserted here (the machine is shared); only that every measurement ran,
that the writers lost nothing, and that the report and plot were written. Redis is
part of the run: with ``CHATZEO_REQUIRE_REDIS=1`` (CI) a missing redis-server fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_benchmark_runs_and_loses_nothing(tmp_path: Path) -> None:
    have_redis = shutil.which("redis-server") is not None
    if not have_redis and os.environ.get("CHATZEO_REQUIRE_REDIS") == "1":
        # Not a skip: without Redis the run still measures chatzeo and the seed.
        pytest.fail("CHATZEO_REQUIRE_REDIS=1 but redis-server is not installed")
    out, plot = tmp_path / "benchmarks.md", tmp_path / "delivery.png"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--plot", str(plot)],
        cwd=REPO, capture_output=True, text=True, timeout=280, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = completed.stdout
    # One append row per writer count, each ending "| lost 0 | 0 |" (lost, duplicated).
    rows = [line for line in report.splitlines() if line.endswith("| lost 0 | 0 |")]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "4", "8"], report
    for system in ("chatzeo", "seed"):
        assert f"| {system} | 100/100 |" in report, report
    if have_redis:
        assert "| redis (fsync always) | 100/100 |" in report, report
    else:
        assert "Redis Streams comparison was skipped" in report
    assert out.read_text().startswith("# chatzeo benchmarks")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_quick_fanout_benchmark_delivers_everything(tmp_path: Path) -> None:
    """bench.fanout's quick run: every reader got every post, no bystander woke,
    a woken reader asked the server for nothing (its room's clock was pushed), and
    the report has the four target ratios. Speed is reported, never asserted."""
    have_redis = shutil.which("redis-server") is not None
    if not have_redis and os.environ.get("CHATZEO_REQUIRE_REDIS") == "1":
        pytest.fail("CHATZEO_REQUIRE_REDIS=1 but redis-server is not installed")
    out, plot = tmp_path / "fanout.md", tmp_path / "fanout.png"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--fanout", "--quick", "--out", str(out),
         "--plot", str(plot)],
        cwd=REPO, capture_output=True, text=True, timeout=190, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
            if line.startswith("| ") and line.count("|") == 11 and "readers" in line]
    systems = {"chatzeo", "redis"} if have_redis else {"chatzeo"}
    assert {row[1].strip() for row in rows} == systems
    assert len(rows) == 3 * len(systems)
    for row in rows:
        _shape, system, _, _, complete, _, requests, woken, _, _ = (cell.strip() for cell in row)
        assert complete == "30/30", row
        assert woken == "0", row  # bystanders never woke for the busy room
        if system == "chatzeo":
            assert float(requests) < 0.5, row  # pushed, not loaded
    if have_redis:
        assert out.read_text().count("| yes |") + out.read_text().count("| NO |") == 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
