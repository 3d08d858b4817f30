"""fwray's one error type. A `FwrayError` is a problem the user can fix: every command prints its message as one
`fwray: error:` line and exits with its `exit_code`. Anything else is a bug and keeps its traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, Sequence


class FwrayError(Exception):
    """A user-facing error: one line that names the problem and the fix."""

    exit_code = 1


class ProbeError(FwrayError):
    """The probe cannot decide, or nothing fits: one line saying what to do."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def last_line(e: BaseException) -> str:
    """The last line of an exception's message, or its type's name when it has none: where a message carries a
    traceback (a Ray worker's error), its last line is the error itself."""
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def command(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """A command's `main(argv) -> exit code`, with fwray's one way out for a problem the user can fix: its
    FwrayError printed as one `fwray: error:` line, the exit code its type carries. Anything else is a bug and keeps
    its traceback."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except FwrayError as e:
            print(f"fwray: error: {e}", file=sys.stderr)
            return e.exit_code

    return run
