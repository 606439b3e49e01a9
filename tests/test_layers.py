"""The package layers hold: import-linter's contracts in pyproject.toml, checked on the installed code."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    out = subprocess.run([exe, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_the_cell_contract_loads_without_torch():
    """analysis and the sweep generator read the cell contract; it must not pull in torch."""
    code = ("import sys; import critbatch.jobs.cell.spec, critbatch.jobs.cell.logschema, critbatch.jobs.store, "
            "critbatch.jobs.sweep.render; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_the_jobs_package_imports_itself_relatively():
    """Inside critbatch.jobs every import of the package's own modules is relative (``from ..cell.spec import
    Cell``), so the folder structure shows in each import; the analysis, a package of its own, stays absolute."""
    absolute = []
    for path in sorted((REPO / "jobs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            absolute += [f"{path.relative_to(REPO)}:{node.lineno}" for n in names
                         if n == "critbatch.jobs" or n.startswith("critbatch.jobs.")]
    assert absolute == []
