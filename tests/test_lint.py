"""The code stays as clean as the README promises: ruff and mypy --strict find nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("command", [
    ["ruff", "check", "."],
    ["mypy", "worker", "tasks"],
], ids=["ruff", "mypy"])
@pytest.mark.timeout(600)
def test_the_linters_find_nothing(command: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
