"""Smoke test of the benchmark (`python -m bench`) on a tiny store.

Runs the command as `make bench` does, and only proves that every
measurement runs and that kitci writes what the floor writes; timings are
never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("floor", "floor+history", "kitci", "original")


def test_benchmark_runs_on_twenty_targets(tmp_path: Path) -> None:
    output = tmp_path / "results" / "bench.json"

    # Every mode, one size, as few repetitions as the options allow.
    command = [
        sys.executable, "-m", "bench", "--sizes", "20", "--repeats", "2",
        "--passes", "1", "--cold-runs", "1", "--tmp", str(tmp_path),
        "--json", str(output),
    ]  # fmt: skip
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr

    # The table names every mode and says something about each target.
    for mode in MODES:
        assert f"20  {mode} " in run.stdout
    assert "Targets (issue #7)" in run.stdout
    assert "measuring kitci" in run.stderr

    # The JSON holds the same figures, and kitci wrote what the floor wrote.
    document = json.loads(output.read_text())
    assert document["meta"]["sizes"] == [20]
    figures = document["results"]["20"]
    assert set(figures) == set(MODES)
    for mode in ("kitci", "original"):
        assert figures[mode]["wrong_statuses"] == 0
        assert figures[mode]["wrong_statuses_end"] == 0
        assert figures[mode]["cold_evaluations"] >= 60
    assert figures["kitci"]["change_evaluations"]["max"] == 3
    assert figures["original"]["change_evaluations"]["min"] >= 60
    assert len(document["targets"]) == 5
