"""Shared fixtures: the command in this process or in a fresh one, and one tiny end-to-end run per session."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The tests' models are tiny: a second intra-op thread buys them nothing, and where cores are shared
# (CI runners, other work on the machine) its spin-waiting makes each step many times slower. So one
# thread, in this process and in the commands it starts, unless OMP_NUM_THREADS is set already.
THREADS_ENV = {"OMP_NUM_THREADS": "1"}
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


def run_bnexport(*args: str | os.PathLike, cwd: Path | None = None, timeout: float = 300) -> CommandResult:
    """Run ``python -m bnexport ARGS`` as a user would, in a fresh process."""
    env = {**THREADS_ENV, **os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "bnexport", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return CommandResult(completed.returncode, completed.stdout, completed.stderr)


def run_cli(*args: str | os.PathLike) -> CommandResult:
    """``bnexport ARGS`` through ``bnexport.cli.main`` in this process: the same parser and handlers
    as the real command, without the two seconds a fresh interpreter spends importing torch.

    Warnings go to stderr as Python's default filters would show them to a user, so that
    ``assert_one_line_error`` sees them. What only a fresh process shows (the interpreter's exit
    status, native libraries writing to file descriptor 2, what gets imported) is left to the
    tests that use ``run_bnexport``.
    """
    from bnexport.cli import main

    threads = torch.get_num_threads()  # `bench --threads` sets it for the whole process
    stdout, stderr = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse: --help, --version and bad flags
            code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
        finally:
            torch.set_num_threads(threads)
    for warning in caught:
        stderr.write(warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno))
    return CommandResult(code, stdout.getvalue(), stderr.getvalue())


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


def listed_subcommands(help_text: str) -> list[str]:
    """The names under argparse's COMMAND heading: the lines indented by exactly four spaces."""
    section = help_text.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return [line.split()[0] for line in section.splitlines() if re.match(r" {4}\S", line)]


def listed_options(help_text: str) -> set[str]:
    """Every option string in the options column of a --help page, e.g. {"-o", "--output", "--json"}."""
    options = set()
    for line in help_text.splitlines():
        match = re.match(r" {2}(-.*?)(?: {2,}|$)", line)
        if match:
            options |= {part.split()[0] for part in match.group(1).split(", ")}
    return options


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def folder_state(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with a file's bytes (None for a folder): what a failed run must leave as it was."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
