"""Readers and writers for the project's two record formats, with errors that name the file, the record and the fault.

* SFT / evaluation sets: the LLaVA-Med JSON list
  `[{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n…"}, {"from": "gpt", "value": "…"}],
  "answer_type"?: "CLOSED"|"OPEN", ...}]` -> `VQARecord`. Keys other than these are kept in `VQARecord.metadata`
  (the converters store organ / modality / question_type / location there). Images are paths relative to an image
  folder. A conversation with several turns yields its first human question and the first gpt answer after it; later
  turns are ignored (Med-VQA sets are single-turn, and HSCR rewrites one answer per sample).
* Preference lists: JSONL, one prompt per line, `{"id", "image"?, "prompt", "responses": [y_w, y_l1, …],
  "similarity"?: [...], "weight"?: float, ...}` -> `PreferenceRecord`, responses ordered best first. A record without
  "image" is text-only (for text-only language models).
* TRL's pairwise preference records on the same lines: `{"prompt", "chosen", "rejected", "images"?: [one path],
  "id"?}`, plain strings or conversational (`[{"role": ..., "content": ...}]`), read as lists of one dispreferred
  response (k = 1). Without an "id" a pair is named by its line ("line-7").

Both loaders take `on_error="raise"` (stop at the first bad record) or `"skip"` (return the bad ones as `SkipReason`s,
so a caller can print counts by reason and go on).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hscr_fast.runtime.errors import HscrError
from hscr_fast.runtime.io import JsonlError, atomic_write_json, parse_jsonl_line

IMAGE_TOKEN = "<image>"
ANSWER_TYPES = ("CLOSED", "OPEN")
_HUMAN_ROLES = ("human", "user")
_GPT_ROLES = ("gpt", "assistant")
_LLAVA_MED_KEYS = ("id", "image", "conversations", "answer_type")
_PREFERENCE_KEYS = ("id", "image", "prompt", "responses", "similarity", "weight")
_TRL_PAIR_KEYS = ("id", "prompt", "chosen", "rejected", "images")

OnError = Literal["raise", "skip"]


class DataFormatError(HscrError):
    """A data file or one of its records is malformed; the message is one line naming file, record and fault."""


@dataclass(frozen=True)
class SkipReason:
    """A record left out, with a short category (`reason`, for counting) and the full one-line `message`."""

    reason: str
    message: str
    record_id: str | None = None


def count_skip_reasons(skipped: list[SkipReason]) -> dict[str, int]:
    """How many records were skipped for each reason, most frequent first."""
    return dict(Counter(skip.reason for skip in skipped).most_common())


@dataclass
class VQARecord:
    """One image-question-answer sample. `question` is the human turn with the `<image>` tag removed; `image` is
    relative to the image folder; `answer_type` is "CLOSED", "OPEN" or None when the source does not say."""

    id: str
    image: str
    question: str
    answer: str
    answer_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_llava_med(self) -> dict[str, Any]:
        """The LLaVA-Med JSON form of this record (the inverse of the reader)."""
        entry: dict[str, Any] = {
            "id": self.id,
            "image": self.image,
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{self.question}"},
                {"from": "gpt", "value": self.answer},
            ],
        }
        if self.answer_type is not None:
            entry["answer_type"] = self.answer_type
        entry.update(self.metadata)
        return entry


@dataclass
class PreferenceRecord:
    """One prompt with its ranked responses: `responses[0]` is preferred, the rest are dispreferred, best first.
    `weight` (optional) scales the sample's loss for weighted preference optimisation."""

    id: str
    image: str | None  # None: a text-only prompt
    prompt: str
    responses: list[str]
    similarity: list[float] | None = None
    weight: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def normalize_answer_type(value: Any) -> str | None:
    """"CLOSED"/"OPEN" from any casing or stray whitespace (" closed "), None for a missing value; raises ValueError
    for anything else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().upper() in ANSWER_TYPES:
        return value.strip().upper()
    raise ValueError(f"answer_type must be CLOSED or OPEN, got {value!r}")


def read_json_list(path: str | os.PathLike, what: str = "a JSON list of records") -> list:
    """Load a file that must hold one JSON list; wrong shapes (JSONL, a dict) get a message saying which it is."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {error.start}); expected {what}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            raise DataFormatError(f"{path}: looks like JSONL (one JSON object per line, line {error.lineno} starts a "
                                  f"second object); expected {what} — wrap the records in [ ... ]") from None
        raise DataFormatError(f"{path}:{error.lineno}:{error.colno}: invalid JSON ({error.msg})") from None
    if isinstance(data, dict):
        keys = ", ".join(list(map(str, data))[:5])
        raise DataFormatError(f"{path}: expected {what}, got a JSON object with keys [{keys}]")
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected {what}, got a JSON {type(data).__name__}")
    return data


class BadRecord(Exception):
    """One record is unusable: `reason` is its category (for counting), `detail` the explanation. Raised by the record
    parsers and turned by the loaders into a `DataFormatError` or a `SkipReason` with the record's location."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _first_exchange(conversations: Any) -> tuple[str, str]:
    """The first human turn's text and the first gpt answer after it."""
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("bad conversations", "'conversations' must be a non-empty list of {from, value} turns")
    question = None
    for turn_number, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecord("bad conversations",
                            f"conversations[{turn_number}] must be an object with 'from' and 'value'")
        role, value = turn["from"], turn["value"]
        is_question = question is None and role in _HUMAN_ROLES
        is_answer = question is not None and role in _GPT_ROLES
        if (is_question or is_answer) and not isinstance(value, str):
            raise BadRecord("bad conversations", f"conversations[{turn_number}] ({role}) value must be a string, "
                                                 f"got {value!r}")
        if is_question:
            question = value
        elif is_answer:
            return question, value
    if question is None:
        raise BadRecord("no question", "no human turn in conversations")
    raise BadRecord("no answer", "no gpt turn (answer) after the human question")


def _strip_image_token(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").strip()


def _check_image(image: Any, image_folder: Path | None) -> str:
    if not isinstance(image, str) or not image.strip():
        raise BadRecord("no image", f"missing or empty 'image' (got {image!r})")
    if image_folder is not None and not (image_folder / image).is_file():
        raise BadRecord("missing image", f"image file not found: {image_folder / image}")
    return image


def _confine_image(image: str | None, image_folder: Path | None, allow_outside: bool) -> None:
    from hscr_fast.data.images import ImageOutsideFolderError, image_in_folder

    if image is None or image_folder is None:
        return
    try:
        image_in_folder(image_folder, image, allow_outside=allow_outside)
    except ImageOutsideFolderError as error:
        raise BadRecord("image outside folder", str(error)) from None


def _parse_llava_med_entry(entry: Any, image_folder: Path | None) -> VQARecord:
    if not isinstance(entry, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {type(entry).__name__}")
    if entry.get("id") is None or str(entry["id"]).strip() == "":
        raise BadRecord("no id", "missing or empty 'id'")
    image = _check_image(entry.get("image"), image_folder)
    question, answer = _first_exchange(entry.get("conversations"))
    if not answer.strip():
        raise BadRecord("empty answer", "the gpt answer is empty")
    try:
        answer_type = normalize_answer_type(entry.get("answer_type"))
    except ValueError as error:
        raise BadRecord("bad answer_type", str(error)) from None
    metadata = {key: value for key, value in entry.items() if key not in _LLAVA_MED_KEYS}
    return VQARecord(id=str(entry["id"]), image=image, question=_strip_image_token(question), answer=answer.strip(),
                     answer_type=answer_type, metadata=metadata)


def load_llava_med_json(path: str | os.PathLike, image_folder: str | os.PathLike | None = None, *,
                        on_error: OnError = "raise", allow_images_outside_folder: bool = False,
                        ) -> tuple[list[VQARecord], list[SkipReason]]:
    """Read a LLaVA-Med JSON list into `VQARecord`s.

    Ids are stringified (numeric ids are fine) and must be unique. With `image_folder`, every image must exist under it
    (its real path inside the folder's, unless `allow_images_outside_folder`).
    A bad record raises `DataFormatError` ("FILE: record INDEX (id ID): WHAT"), or with `on_error="skip"` is returned in
    the skip list instead. A file of the wrong shape always raises.
    """
    _check_on_error(on_error)
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else None
    entries = read_json_list(path, "a JSON list of LLaVA-Med records")
    records: list[VQARecord] = []
    skipped: list[SkipReason] = []
    first_index_of: dict[str, int] = {}
    for index, entry in enumerate(entries):
        record_id = str(entry["id"]) if isinstance(entry, dict) and entry.get("id") is not None else None
        try:
            record = _parse_llava_med_entry(entry, folder)
            _confine_image(record.image, folder, allow_images_outside_folder)
            if record.id in first_index_of:
                raise BadRecord("duplicate id", f"id already used by record {first_index_of[record.id]}")
        except BadRecord as bad:
            location = f"record {index}" + (f" (id {record_id!r})" if record_id is not None else "")
            _report(f"{path}: {location}: {bad.detail}", bad.reason, record_id, on_error, skipped)
            continue
        first_index_of[record.id] = index
        records.append(record)
    return records, skipped


def write_llava_med_json(path: str | os.PathLike, records: list[VQARecord]) -> None:
    """Write records as a LLaVA-Med JSON list, atomically (a crash never leaves a half-written file)."""
    atomic_write_json(path, [record.to_llava_med() for record in records], indent=1)


def _parse_preference_entry(entry: dict, image_folder: Path | None, min_responses: int,
                            line_number: int) -> PreferenceRecord:
    if "chosen" in entry or "rejected" in entry:
        return _parse_trl_pair(entry, image_folder, line_number)
    missing = [key for key in ("id", "prompt", "responses") if key not in entry]
    if missing:
        raise BadRecord("missing keys", f"missing key(s) {missing}; a preference line needs id, prompt, responses "
                                        "(and image, for a vision-language model), or TRL's prompt, chosen, rejected")
    image = None if entry.get("image") is None else _check_image(entry["image"], image_folder)
    if not isinstance(entry["prompt"], str):
        raise BadRecord("bad prompt", f"'prompt' must be a string, got {type(entry['prompt']).__name__}")
    responses = entry["responses"]
    if not isinstance(responses, list) or not responses:
        raise BadRecord("empty responses", f"'responses' must be a non-empty list of strings "
                                           f"[preferred, dispreferred...], got {responses!r}")
    for position, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise BadRecord("bad response", f"responses[{position}] must be a non-empty string, got {response!r}")
    if len(responses) < min_responses:
        raise BadRecord("too few responses", f"{len(responses)} response(s); need at least {min_responses} "
                                             f"(the preferred one and at least one dispreferred)")
    similarity = entry.get("similarity")
    if similarity is not None and (not isinstance(similarity, list) or not all(map(_is_finite_number, similarity))):
        raise BadRecord("bad similarity", f"'similarity' must be a list of finite numbers, got {similarity!r}")
    weight = entry.get("weight")
    if weight is not None and (not _is_finite_number(weight) or weight < 0):
        raise BadRecord("bad weight", f"'weight' must be a finite number >= 0, got {weight!r}")
    metadata = {key: value for key, value in entry.items() if key not in _PREFERENCE_KEYS}
    return PreferenceRecord(id=str(entry["id"]), image=image, prompt=entry["prompt"], responses=responses,
                            similarity=None if similarity is None else [float(s) for s in similarity],
                            weight=None if weight is None else float(weight), metadata=metadata)


def load_preference_jsonl(path: str | os.PathLike, image_folder: str | os.PathLike | None = None, *,
                          on_error: OnError = "raise", min_responses: int = 2,
                          allow_images_outside_folder: bool = False,
                          ) -> tuple[list[PreferenceRecord], list[SkipReason]]:
    """Read a preference-list JSONL file into `PreferenceRecord`s, validating every line.

    Errors name the line ("FILE:LINE (id ID): WHAT"): invalid JSON, missing keys, an empty responses list, a response
    that is not a non-empty string, fewer than `min_responses` responses, a duplicate id, and — when `image_folder` is
    given — an image that does not exist under it or leads outside it (unless `allow_images_outside_folder`). Blank
    lines are ignored.
    """
    _check_on_error(on_error)
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    folder = Path(image_folder) if image_folder is not None else None
    records: list[PreferenceRecord] = []
    skipped: list[SkipReason] = []
    first_line_of: dict[str, int] = {}
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise JsonlError(f"{path}:{line_number}: not UTF-8 text") from None
                entry = parse_jsonl_line(text, path, line_number)
            except JsonlError as error:
                _report(str(error), "invalid JSON", None, on_error, skipped)
                continue
            record_id = str(entry["id"]) if entry.get("id") is not None else None
            try:
                record = _parse_preference_entry(entry, folder, min_responses, line_number)
                _confine_image(record.image, folder, allow_images_outside_folder)
                if record.id in first_line_of:
                    raise BadRecord("duplicate id", f"id already used on line {first_line_of[record.id]}")
            except BadRecord as bad:
                location = f"{path}:{line_number}" + (f" (id {record_id!r})" if record_id is not None else "")
                _report(f"{location}: {bad.detail}", bad.reason, record_id, on_error, skipped)
                continue
            first_line_of[record.id] = line_number
            records.append(record)
    return records, skipped


def _parse_trl_pair(entry: dict, image_folder: Path | None, line_number: int) -> PreferenceRecord:
    """A TRL preference pair (explicit prompt; plain or conversational) as a list of two responses."""
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in entry]
    if missing:
        raise BadRecord("missing keys", f"missing key(s) {missing}; a TRL preference pair needs prompt, chosen and "
                                        "rejected (a pair whose prompt is inside chosen/rejected can be split with "
                                        "trl.data_utils.extract_prompt first)")
    prompt = _trl_text(entry["prompt"], "prompt", "user")
    chosen = _trl_text(entry["chosen"], "chosen", "assistant")
    rejected = _trl_text(entry["rejected"], "rejected", "assistant")
    images = entry.get("images")
    if images is not None and (not isinstance(images, list) or len(images) > 1):
        raise BadRecord("bad images", f"'images' must list at most one image path (one image per prompt), got "
                                      f"{images!r}")
    image = _check_image(images[0], image_folder) if images else None
    metadata = {key: value for key, value in entry.items() if key not in _TRL_PAIR_KEYS}
    record_id = str(entry["id"]) if entry.get("id") is not None else f"line-{line_number}"
    return PreferenceRecord(id=record_id, image=image, prompt=prompt, responses=[chosen, rejected],
                            metadata={**metadata, "source_format": "trl"})


def _trl_text(value: Any, key: str, role: str) -> str:
    """The text of a TRL field: a string, or one message of `role` whose content is a string or typed parts (text
    parts joined; image parts mark where TRL puts the image, which the prompt format decides here)."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != role:
            roles = [message.get("role") if isinstance(message, dict) else message for message in value]
            raise BadRecord(f"bad {key}", f"'{key}' must be a string or one {role!r} message; got messages with "
                                          f"roles {roles} (multi-turn and system prompts are not supported)")
        value = value[0].get("content")
        if isinstance(value, list):
            value = "".join(part.get("text", "") for part in value if isinstance(part, dict) and
                            part.get("type") == "text")
    if not isinstance(value, str) or not _strip_image_token(value):
        raise BadRecord(f"bad {key}", f"'{key}' must hold non-empty text, got {value!r}")
    return _strip_image_token(value) if key == "prompt" else value.strip()


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _report(message: str, reason: str, record_id: str | None, on_error: OnError, skipped: list[SkipReason]) -> None:
    if on_error == "raise":
        raise DataFormatError(message)
    skipped.append(SkipReason(reason=reason, message=message, record_id=record_id))
