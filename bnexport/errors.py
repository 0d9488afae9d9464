"""Errors a user can act on, the exit status of each, and the one-line form of a library's error.

The CLI prints them on one line and exits with ``exit_code_for(err)``. Nothing here imports
torch, so the command line can report any of them without loading it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # a verification found different numbers (parity)
EXIT_BAD_INPUT = 2  # a file, a flag or a dataset the user can fix
EXIT_PEER_FAILED = 3  # under torchrun, a peer process died or stopped answering
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class BnexportError(Exception):
    """A problem with the user's input: a file, a flag or a dataset. Never a bug."""


class CheckFailed(Exception):
    """A verification found different numbers (exit status 1). ``report`` holds the evidence."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class DistributedFailure(BnexportError):
    """A peer died, stopped answering within the timeout, or never joined. Exit status 3."""


class SharedError(BnexportError):
    """An error every rank raises together; rank 0 reports it, the others exit quietly."""


# The most specific class comes first: a DistributedFailure is also a BnexportError.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (DistributedFailure, EXIT_PEER_FAILED),
    (BnexportError, EXIT_BAD_INPUT),
    (CheckFailed, EXIT_CHECK_FAILED),
    (KeyboardInterrupt, EXIT_INTERRUPTED),
)


def exit_code_for(err: BaseException) -> int:
    """The command's exit status for ``err``; 1, Python's own status for an uncaught exception, for any other."""
    return next((code for kind, code in EXIT_CODES if isinstance(err, kind)), 1)


def is_rank_zero(env: Mapping[str, str] = os.environ) -> bool:
    """True outside torchrun, and on the rank that reports for all of them."""
    return env.get("RANK", "0") == "0"


def reported_here(err: BaseException, env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process prints ``err``: every rank says what it saw (the one that knows may be
    gone), except for an error all ranks share, which rank 0 reports for them."""
    return is_rank_zero(env) or not isinstance(err, SharedError)


# SGR sequences: torch colours parts of some messages (torch.load, the ONNX exporter)
_TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def first_line(err: BaseException, *, limit: int = 200) -> str:
    """An exception's first non-empty line, without terminal colours, cut to ``limit``; its type
    name when it says nothing.

    Library errors (protobuf, ORT, torch) often span many lines; a one-line message keeps one.
    """
    lines = [line.strip() for line in _TERMINAL_COLOURS.sub("", str(err)).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]
