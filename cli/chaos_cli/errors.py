"""Errors that the CLI reports as one clear line: exit code 2 for bad input, 1 for a run
that failed."""


class UserError(Exception):
    """Bad input from the user: reported on stderr without a traceback, exit code 2."""


class RunFailed(Exception):
    """A run that started and failed (a worker stopped with an error): reported on stderr
    without a traceback, exit code 1."""
