"""The errors every command shares, and the one place they become exit codes.

Library code raises; it never exits. A command's `main` runs its body through `exit_code_of`, which prints one line
for the user and returns the exit code:
- 2: bad input or settings (`HscrError`, or a path given that does not exist) — nothing was spent on it yet, or what
  was computed is kept on disk;
- 3: training diverged (`TrainingDiverged`) — the message names the last good checkpoint.
"""
from __future__ import annotations

import sys
from typing import Callable

BAD_INPUT, DIVERGED = 2, 3


class HscrError(ValueError):
    """Bad input or settings. The message is one line that names the file, record, line or flag at fault and what to
    do about it. Every error class of the library derives from it."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or parameter stopped training; the message names the last good checkpoint."""


def exit_code_of(body: Callable[[], int | None]) -> int:
    """Runs a command's body and returns its exit code: its own (0 when it returns None), or the code of the error
    it raised, after one `error: ...` line on stderr (no traceback: the message says what is wrong)."""
    try:
        return body() or 0
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return DIVERGED
    except (HscrError, FileNotFoundError, NotADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT
