"""The one error type a user can fix. The CLI prints it on one line and exits 2."""


class BnexportError(Exception):
    """A problem with the user's input: a file, a flag or a dataset. Never a bug."""


class CheckFailed(Exception):
    """A verification found different numbers (exit status 1). ``report`` holds the evidence."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
