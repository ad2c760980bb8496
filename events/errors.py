"""The base of every error slidr raises on purpose.

An error a user can cause and fix (a missing broker, registry, version or file, a bad
flag or setting, a refused guardrail) derives from ``SlidrError``: the command line
prints its message as one line and exits with its ``exit_code``, without a traceback.
Anything else that escapes is a bug, and its traceback is printed.
"""

from __future__ import annotations

EXIT_ERROR = 2  # the default for a user error
EXIT_GUARDRAIL = 3  # a guardrail refused: nothing registered or promoted


class SlidrError(Exception):
    """An error slidr expects; the message says what went wrong and what to do."""

    exit_code: int = EXIT_ERROR

    def __init__(self, message: str = "", exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(SlidrError, ValueError):
    """A flag value or a combination of flags that a command cannot use."""
