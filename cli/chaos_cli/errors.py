"""Errors that the CLI reports as one clear line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: reported on stderr without a traceback, exit code 2."""
