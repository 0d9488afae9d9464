"""Shared fixtures: the real command in a subprocess, and one tiny end-to-end run per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


def run_bnexport(*args: str | os.PathLike, cwd: Path | None = None, timeout: float = 300) -> CommandResult:
    """Run ``python -m bnexport ARGS`` as a user would, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "bnexport", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return CommandResult(completed.returncode, completed.stdout, completed.stderr)


def assert_one_line_error(result: CommandResult, *fragments: str) -> None:
    """Exit 2, a single line on stderr naming the problem, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One real ``train-and-export`` on the bundled digits, cut to a few steps."""
    out = tmp_path_factory.mktemp("tiny_run")
    result = run_bnexport("train-and-export", "--epochs", "2", "--max-steps", "8", "--quiet", "--out", out)
    assert result.returncode == 0, result.stderr
    (out / "stdout.txt").write_text(result.stdout)
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
