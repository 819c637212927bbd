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

REPO = Path(__file__).resolve().parent.parent


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
