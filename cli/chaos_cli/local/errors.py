"""The error of a local run that could not start or whose worker failed."""

from __future__ import annotations


class LaunchError(Exception):
    """The job could not start or a worker failed; the message says why. `failed`: a
    worker stopped with an error of its own at run time (not a bad input of the run's)."""

    def __init__(self, message: str, *, failed: bool = False) -> None:
        super().__init__(message)
        self.failed = failed
