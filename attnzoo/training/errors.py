"""The error type the CLIs print as one line instead of a traceback."""


class UsageError(Exception):
    """Bad input the user can fix (path, model name, class count, checkpoint): the message says how."""
