"""fwray's one error type. A `FwrayError` is a problem the user can fix: every command prints its message as one
`fwray: error:` line and exits with its `exit_code`. Anything else is a bug and keeps its traceback."""
from __future__ import annotations


class FwrayError(Exception):
    """A user-facing error: one line that names the problem and the fix."""

    exit_code = 1


class ProbeError(FwrayError):
    """The probe cannot decide, or nothing fits: one line saying what to do."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
