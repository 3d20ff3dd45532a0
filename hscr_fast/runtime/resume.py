"""Resuming only what the same settings made: a settings file beside a resumable command's output.

A resumable command (generate, ...) writes `OUT.settings.json` before its first output line: the settings that decide
the output's content, and a short content hash of every input record it was asked to process. A rerun into the same
OUT compares its own settings and records with that file and refuses, naming each setting that differs (and the
records whose content changed), instead of mixing the results of two different runs in one file. Records that were
not part of the earlier run (a larger --num-samples, say) are new work, not a conflict.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hscr_fast.runtime.errors import HscrError
from hscr_fast.runtime.io import atomic_write_json, read_json_file

_SHOWN = 5  # differing records named in a message


class SettingsChangedError(HscrError):
    """A rerun into an existing output uses other settings or changed input records."""


def content_hash(value: Any) -> str:
    """16 hex digits of a JSON value's canonical form (key order and spacing do not count)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def check_same_settings(path: Path, output: Path, settings: dict[str, Any], records: dict[str, str]) -> None:
    """Raise `SettingsChangedError` when `path` (the settings file of `output`) records other `settings` or another
    content hash for any record id in `records`; nothing to check when the file does not exist yet."""
    if not path.is_file():
        return
    earlier = read_json_file(path, SettingsChangedError)
    before = earlier.get("settings", {})
    differences = [f"{key} {before.get(key)!r} then, {settings.get(key)!r} now"
                   for key in sorted(set(before) | set(settings)) if before.get(key) != settings.get(key)]
    earlier_records = earlier.get("records", {})
    changed = [record_id for record_id, digest in records.items()
               if record_id in earlier_records and earlier_records[record_id] != digest]
    if changed:
        named = ", ".join(repr(record_id) for record_id in changed[:_SHOWN])
        named += ", ..." if len(changed) > _SHOWN else ""
        differences.append(f"{len(changed)} input record(s) changed since they were processed ({named})")
    if differences:
        raise SettingsChangedError(f"{output} was made with other settings: {'; '.join(differences)}. Rerun with the "
                                   f"original settings and data to resume it, or choose another --out (nothing was "
                                   f"changed)")


def record_settings(path: Path, settings: dict[str, Any], records: dict[str, str]) -> None:
    """Write (atomically) the settings and the record hashes, keeping those of records processed by earlier runs."""
    earlier = read_json_file(path, SettingsChangedError).get("records", {}) if path.is_file() else {}
    atomic_write_json(path, {"settings": settings, "records": {**earlier, **records}})
