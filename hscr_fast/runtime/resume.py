"""Resuming only what the same settings made: one way for every command to tell whether output on disk can be
continued, and to say exactly why not.

Each resumable output records what decided its content: its settings (a flat dict of values) and, where the inputs
are records, a content hash of each record. A rerun compares its own with the recorded ones
(`setting_differences`, `record_differences`) and, if anything differs, `refuse_changes` raises one
`SettingsChangedError` naming each setting (its value then and now) and record that differs, and what to do. Which
settings count is each command's choice, made where it builds the dict:
- generate (`OUT.settings.json`, written here by `record_settings`): every setting that decides a list, the model,
  data and image folder, the batch size, and every selected record; a larger --num-samples is new work, not a change;
- train (the checkpoint's `run`): the model and data (`preferences_fingerprint`), the loss kind and its weights
  (kind weights, token KL, NLL), the world size, batch geometry, epochs, seed and held-out split; the learning rate,
  γ, save and log intervals may change on resume;
- evaluate (`run.json` beside the predictions): the settings that change the generated answers, not the batch size,
  device or --limit;
- the reference log-prob cache is found by `content_hash` of its settings (model files, preference file, prompt
  format, dtype): other settings simply name another cache file.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hscr_fast.runtime.errors import HscrError
from hscr_fast.runtime.io import PathLike, atomic_write_json, read_json_file

_SHOWN = 5  # differing records named in a message
THEN_AND_NOW = "{key} {earlier!r} then, {now!r} now"


class SettingsChangedError(HscrError):
    """A run would continue output made with other settings or from other input records."""


def content_hash(value: Any) -> str:
    """16 hex digits of a JSON value's canonical form (key order and spacing do not count): the identity of a
    record, or of a run's settings."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def fingerprint_of(values: dict[str, Any]) -> str:
    """The settings' identity stored on every output line of generate and image_preferences: `content_hash` with
    non-ASCII characters escaped, as those lines have always been hashed (a rehash would refuse their resumes)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: PathLike) -> str:
    """The sha256 of a file's bytes (hex), for settings that are a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def setting_differences(earlier: Mapping[str, Any], now: Mapping[str, Any], *, keys: Iterable[str] | None = None,
                        defaults: Mapping[str, Any] | None = None, wording: str = THEN_AND_NOW) -> list[str]:
    """One phrase per setting in `keys` (default: every key of either) whose value differs; `defaults` stand in for
    settings `earlier` did not record yet (it ran with them)."""
    earlier = {**(defaults or {}), **earlier}
    names = sorted(set(earlier) | set(now)) if keys is None else list(keys)
    return [wording.format(key=key, earlier=earlier.get(key), now=now.get(key))
            for key in names if earlier.get(key) != now.get(key)]


def record_differences(earlier: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """A phrase naming the records (id → content hash) of `now` that `earlier` holds with another content; records
    `earlier` never saw are new work, not a difference."""
    changed = [record_id for record_id, digest in now.items() if record_id in earlier and earlier[record_id] != digest]
    if not changed:
        return []
    named = ", ".join(repr(record_id) for record_id in changed[:_SHOWN]) + (", ..." if len(changed) > _SHOWN else "")
    return [f"{len(changed)} input record(s) changed since they were processed ({named})"]


def refuse_changes(made: PathLike | str, differences: list[str], remedy: str) -> None:
    """Raise `SettingsChangedError` when there are `differences`: `made` (the output) was made with other settings;
    `remedy` says how to resume it or what to do instead."""
    if differences:
        raise SettingsChangedError(f"{made} was made with other settings: {'; '.join(differences)}; {remedy}")


def check_same_arguments(path: PathLike, line: dict, fingerprint: str) -> None:
    """An output line carries its run's settings fingerprint: a resumed run may only add to lines of its own."""
    if line.get("args_fingerprint") != fingerprint:
        refuse_changes(path, [f"different arguments (args_fingerprint {line.get('args_fingerprint')!r} then, "
                              f"{fingerprint!r} now)"],
                       "re-run with the original arguments to resume, or choose a new --out")


# -- a settings file beside the output (generate) ----------------------------------------------------------------------
def check_same_settings(path: Path, output: Path, settings: dict[str, Any], records: dict[str, str]) -> None:
    """Refuse when `path` (the settings file of `output`) records other `settings` or another content hash for any
    record id in `records`; nothing to check when the file does not exist yet."""
    if not path.is_file():
        return
    earlier = read_json_file(path, SettingsChangedError)
    refuse_changes(output, setting_differences(earlier.get("settings", {}), settings)
                   + record_differences(earlier.get("records", {}), records),
                   "rerun with the original settings and data to resume it, or choose another --out (nothing was "
                   "changed)")


def record_settings(path: Path, settings: dict[str, Any], records: dict[str, str]) -> None:
    """Write (atomically) the settings and the record hashes, keeping those of records processed by earlier runs."""
    earlier = read_json_file(path, SettingsChangedError).get("records", {}) if path.is_file() else {}
    atomic_write_json(path, {"settings": settings, "records": {**earlier, **records}})
