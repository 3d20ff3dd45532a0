"""Which code made a result: every result file (ablations, demo records, benchmarks) records it the same way."""
from __future__ import annotations

import subprocess
from pathlib import Path

# The checkout this package lives in (src layout free: hscr_fast/ sits at the repository root).
REPOSITORY = Path(__file__).resolve().parents[2]


def source_commit(root: Path = REPOSITORY) -> str | None:
    """The checkout's HEAD, with "+dirty" when tracked files differ from it; None outside a git checkout (an
    installed wheel) or without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")
