"""User-facing errors: one line that names the problem and the fix, exit code 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user. The CLI prints it as one line and exits with code 2."""

    exit_code = 2
