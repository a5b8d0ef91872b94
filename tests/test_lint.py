"""The code passes the linter and formatter configured in pyproject.toml ([tool.ruff])."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> str:
    found = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    assert Path(found).exists(), "ruff is needed for this test (pip install '.[test]' installs it)"
    return found


def test_ruff_check():
    result = subprocess.run([_ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = subprocess.run([_ruff(), "format", "--check", "--diff", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout[-5000:] + result.stderr
