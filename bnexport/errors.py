"""Errors a user can act on, and the one-line form of a library's error. The CLI prints them on one line."""


class BnexportError(Exception):
    """A problem with the user's input: a file, a flag or a dataset. Never a bug."""


class CheckFailed(Exception):
    """A verification found different numbers (exit status 1). ``report`` holds the evidence."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def first_line(err: BaseException, *, limit: int = 200) -> str:
    """An exception's first non-empty line, cut to ``limit``; its type name when it says nothing.

    Library errors (protobuf, ORT, torch) often span many lines; a one-line message keeps one.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]
