"""The one error type a user can fix. The CLI prints it on one line and exits 2."""


class BnexportError(Exception):
    """A problem with the user's input: a file, a flag or a dataset. Never a bug."""
