"""The container image, built and run on this machine (opt-in: CRITBATCH_IMAGE_TESTS=1).

Builds the Dockerfile on a locally made Debian base and runs one digits cell in it against a loopback
S3 server; see run_image_test.sh beside this file. Minutes and a few GB of disk, so not in every run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().with_name("run_image_test.sh")


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CRITBATCH_IMAGE_TESTS") != "1", reason="opt-in: set CRITBATCH_IMAGE_TESTS=1")
def test_image_builds_and_runs_a_digits_cell():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "image test passed: cell" in result.stdout
