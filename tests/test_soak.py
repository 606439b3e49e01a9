"""The fault soak in reduced form: two rounds of kills, concurrent runs, an S3 outage or a cut part, nothing lost.

The full soak (50 rounds) is benchmarks/soak_faults.py; this runs its reduced form (one cell, outages of 2-3 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.s3]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_faults.py"


def test_two_rounds_of_faults_lose_nothing(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "2", "--reduced", "--seed", "3",
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(out.read_text())
    assert summary["rounds"] == 2 and summary["cells_lost"] == 0 and summary["lost"] == []
    assert sum(summary["faults"].values()) >= 2  # seed 3: a second run and a SIGKILL of run, then of a trainer
