"""Errors the CLI turns into one line on stderr and an exit code, with no traceback (unless --debug)."""

from __future__ import annotations


class OverdriveError(Exception):
    """An expected failure with a message that names the problem and the fix."""

    exit_code = 1


class UsageError(OverdriveError):
    """Bad input from the user: exit code 2, raised before anything is written."""

    exit_code = 2


class TrainingDiverged(OverdriveError):
    """The loss became non-finite: exit code 3; the checkpoints already written are kept."""

    exit_code = 3
