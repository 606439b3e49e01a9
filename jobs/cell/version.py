"""Which code produced a result: recorded in every cell.json, _SUCCESS and report."""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path

from .. import __version__

#: Set by the image build (``--build-arg CRITBATCH_COMMIT=...``): a pod has no git checkout.
COMMIT_ENV = "CRITBATCH_COMMIT"


@lru_cache(maxsize=1)
def code_version() -> str:
    """The package version, plus the commit: the image's build argument, else ``git describe`` of a checkout."""
    rev = os.environ.get(COMMIT_ENV, "").strip()
    if not rev:
        root = Path(__file__).resolve().parents[2]
        try:
            rev = subprocess.run(
                ["git", "-C", str(root), "describe", "--always", "--dirty"],
                capture_output=True, text=True, timeout=5, check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            rev = ""
    return f"{__version__}+{rev}" if rev else __version__
