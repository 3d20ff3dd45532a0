"""Crash-safe file output shared by the long-running commands (convert, generate, evaluate, train).

Two rules keep an interrupted run from leaving a broken file behind:

* Whole files (JSON datasets, reports, checkpoints) are written to a temporary file in the same folder and moved into
  place with `os.replace`, which is atomic on POSIX and Windows: a reader sees the old file or the new one, never half.
* Progress logs are JSONL, one record per line, appended and flushed record by record. A run killed mid-write can
  leave only a torn *last* line; `JsonlAppender` repairs that on reopen and reports which ids are done, so the job
  resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from hscr_fast.runtime.errors import HscrError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


class JsonlError(HscrError):
    """A JSONL file has a line that is not a JSON object; the message names the file and the line number."""


class OutputOverInputError(HscrError):
    """An output path of a command is one of its inputs (or lies inside its model folder)."""


class OutputNotWritableError(HscrError):
    """An output path cannot be written (its parent is a file, or the folder is read-only)."""


def check_writable(path: PathLike, flag: str, *, folder: bool) -> None:
    """Before any work: `path` (a folder to write into when `folder`, else a file) can be created and written.
    Raises `OutputNotWritableError` naming the flag and the reason; creates nothing."""
    path = Path(path).absolute()
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise OutputNotWritableError(f"{flag} {path} is {kind}; give {'a folder' if folder else 'a file path'}")
    nearest = path if folder else path.parent
    while not nearest.exists():  # the first ancestor that exists is where the missing folders would be made
        nearest = nearest.parent
    if not nearest.is_dir():
        raise OutputNotWritableError(f"{flag} {path}: {nearest} is a file, so no folder can be made under it")
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as error:
        raise OutputNotWritableError(f"{flag} {path}: cannot write in {nearest} ({error.strerror}); choose a "
                                     f"writable location") from None


def refuse_outputs_over_inputs(outputs: dict[str, PathLike], inputs: dict[str, PathLike | None],
                               *, whole_folders: tuple[str, ...] = ("--model",)) -> None:
    """Raise `OutputOverInputError` before anything is opened for writing when a file a command would write (named
    by how the user chose it, e.g. "--out") is an input: the same path after symlinks, the same file through a hard
    link, or a path inside one of the `whole_folders` inputs (a model folder is never written into)."""
    for output_name, output in outputs.items():
        output = Path(output).resolve()
        for input_name, given in inputs.items():
            if given is None:
                continue
            source = Path(given).resolve()
            same = output == source or (output.exists() and source.exists() and os.path.samefile(output, source))
            inside = input_name in whole_folders and source.is_dir() and source in output.parents
            if same or inside:
                where = "is" if same else "lies inside"
                raise OutputOverInputError(f"{output_name} {output} {where} the {input_name} input {source}; "
                                           f"writing there would destroy it — choose another {output_name}")


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on normal exit move it onto `path`, on an exception delete it.

    For writers that want a file name rather than a string (`torch.save`, `safetensors.torch.save_file`, PIL).
    The temporary file lives in the destination folder so that `os.replace` never crosses a filesystem.
    """
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        yield temporary
        _fsync_file(temporary)
        # mkstemp creates the file 0600; give it the permissions a plain open() would (0666 less the umask).
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; on normal exit it takes the place of `path` (whose old contents
    are removed after the swap), on an exception `path` is left as it was and the staging folder is removed.

    Readers see the old folder or the complete new one, never a half-written one: the swap is two renames within one
    filesystem, between which `path` is briefly absent."""
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"))
    os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp makes it 0700; a plain mkdir would not
    try:
        yield staging
        if destination.exists():
            retired = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".old"))
            os.replace(destination, retired / destination.name)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Write `text` to `path` so that readers never see a partially written file."""
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding=encoding)


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Serialise `obj` as UTF-8 JSON and write it atomically. Serialisation happens first, so an object that is not
    JSON-serialisable raises before anything touches the disk."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json_file(path: PathLike, error: type[Exception] = ValueError) -> Any:
    """The JSON value in `path`. A file that is not UTF-8 text or not JSON raises `error`, naming the file and where
    the parser stopped."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path}: not valid JSON ({problem})") from None


def parse_jsonl_line(text: str, path: PathLike, line_number: int) -> dict:
    """Parse one JSONL line into a dict, or raise `JsonlError` naming `path:line_number` and what is wrong."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        # json's own messages may end in "at" ("Unterminated string starting at"): the column completes them.
        joint = " " if error.msg.endswith(" at") else " at "
        raise JsonlError(f"{path}:{line_number}: invalid JSON ({error.msg}{joint}column {error.colno})") from None
    if not isinstance(value, dict):
        raise JsonlError(f"{path}:{line_number}: expected a JSON object per line, got {type(value).__name__}")
    return value


def read_jsonl(path: PathLike) -> list[dict]:
    """Read a JSONL file (one JSON object per line; blank lines ignored) with line-numbered errors.

    A bad final line without a trailing newline is almost always the torn write of an interrupted run; the error says
    so, because `JsonlAppender` can repair it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: JSONL file not found")
    with path.open("r", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    records = []
    for line_number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            records.append(parse_jsonl_line(text, path, line_number))
        except JsonlError as error:
            if line_number == len(lines):  # no newline after it: the write was cut off
                raise JsonlError(f"{error} — the last line is incomplete, probably from an interrupted run; "
                                 f"reopen the file with JsonlAppender to drop it and resume") from None
            raise
    return records


class JsonlAppender:
    """Append JSON records to a JSONL progress file, one flushed line per record, resuming an earlier run.

    On opening an existing file it keeps every complete record and drops a torn last line — a final line that is not
    valid JSON (with or without a newline), as left by a process killed mid-write — with a warning, but only in a file
    it can prove it wrote: at least one complete record before the torn line, and every complete record accepted by
    `owns` (e.g. "carries this run's fingerprint") when given. Anything else raises `JsonlError` and the file is left
    untouched: a file holding no complete record, a line that is valid JSON but not an object (a JSON list or a
    compact dump is never a torn write), or a bad line *followed by* good lines (a corrupted file). A valid final
    record that merely lacks its newline is kept and the newline added.

    `ids` holds `str(record[id_key])` of every record in the file (existing and appended), so a job can skip finished
    work: `if sample.id in appender.ids: continue`. Appending a second record with an id already present raises, since
    in a resumable job that is a bug. `fsync=True` also forces each line to disk (survives power loss, slower).

        with JsonlAppender(out_path) as out:
            for sample in samples:
                if sample.id not in out.ids:
                    out.append({"id": sample.id, ...})
    """

    def __init__(self, path: PathLike, *, id_key: str | None = "id", fsync: bool = False,
                 owns: Callable[[dict], bool] | None = None):
        self.path = Path(path)
        self.id_key = id_key
        self.owns = owns
        self.fsync = fsync
        self.ids: set[str] = set()
        self.num_existing = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._recover_existing()
        self._handle = self.path.open("ab")

    def _recover_existing(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")  # for a well-formed file the piece after the final newline is b""
        keep_bytes = 0  # length of the prefix made of complete, valid lines
        records = []
        for line_number, raw in enumerate(lines, start=1):
            if raw.strip():
                record = self._parse_or_none(raw, line_number)
                if record is None:
                    if any(later.strip() for later in lines[line_number:]):
                        raise JsonlError(f"{self.path}:{line_number}: invalid JSON line followed by further records; "
                                         f"the file is corrupted, not just cut off — fix or remove that line")
                    self._refuse_unless_owned(records, line_number)
                    logger.warning("%s:%d: dropping a torn last line (%d bytes) left by an interrupted run",
                                   self.path, line_number, len(raw))
                    break
                records.append(record)
                self._track(record)
                self.num_existing += 1
            keep_bytes += len(raw) + 1
        keep_bytes = min(keep_bytes, len(data))
        if keep_bytes < len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(keep_bytes)
        elif data and not data.endswith(b"\n"):
            # A complete record whose newline never got written: finish the line so the next append starts fresh.
            with self.path.open("ab") as handle:
                handle.write(b"\n")

    def _refuse_unless_owned(self, records: list[dict], line_number: int) -> None:
        """Truncating is allowed only in a file this writer's records prove it wrote."""
        foreign = not records or (self.owns is not None and not all(self.owns(record) for record in records))
        if foreign:
            raise JsonlError(f"{self.path}:{line_number}: not JSON, and the file holds no complete record this "
                             f"command wrote, so it is not its own interrupted output; left untouched — choose "
                             f"another output path, or delete the file if it is a leftover")

    def _parse_or_none(self, raw: bytes, line_number: int) -> dict | None:
        """The record on a line, None for a line that is not JSON (possibly torn); JSON that is not an object is
        no torn write, hence not this writer's file."""
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(value, dict):
            raise JsonlError(f"{self.path}:{line_number}: a JSON {type(value).__name__}, not one object per line: "
                             f"this is not a JSONL file this command wrote; left untouched — choose another output "
                             f"path")
        return value

    def _track(self, record: dict) -> None:
        if self.id_key is not None and self.id_key in record:
            self.ids.add(str(record[self.id_key]))

    def append(self, record: dict) -> None:
        """Write `record` as one line and flush it (and fsync when asked) before returning."""
        if self._handle.closed:
            raise ValueError(f"{self.path}: JsonlAppender is closed")
        if self.id_key is not None and self.id_key in record and str(record[self.id_key]) in self.ids:
            raise ValueError(f"{self.path}: id {record[self.id_key]!r} is already in the file; "
                             f"check `appender.ids` before appending to resume without duplicates")
        line = json.dumps(record, ensure_ascii=False) + "\n"
        # One write call per record keeps a crash from interleaving two half records.
        self._handle.write(line.encode("utf-8"))
        self._handle.flush()
        if self.fsync:
            os.fsync(self._handle.fileno())
        self._track(record)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _fsync_file(path: Path) -> None:
    # Without this, a crash right after os.replace can leave an empty file under the final name on some filesystems.
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


@dataclass(frozen=True)
class OutputFiles:
    """A resumable command's files for `--out OUT.jsonl`: the records, `OUT.skipped.jsonl` (what was left out and
    why), `OUT.settings.json` (what a resumed run must match) and `OUT.summary.json`."""

    out: Path

    @property
    def stem(self) -> Path:
        return self.out.with_suffix("") if self.out.suffix == ".jsonl" else self.out

    @property
    def skipped(self) -> Path:
        return self.stem.with_name(self.stem.name + ".skipped.jsonl")

    @property
    def settings(self) -> Path:
        """What a rerun must match to resume (`hscr_fast.runtime.resume`)."""
        return self.stem.with_name(self.stem.name + ".settings.json")

    @property
    def summary(self) -> Path:
        return self.stem.with_name(self.stem.name + ".summary.json")
