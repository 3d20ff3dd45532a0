"""Convert public Med-VQA releases into the project's LLaVA-Med JSON format.

    python -m hscr_fast.data.convert vqa-rad --src DIR --out DIR
    python -m hscr_fast.data.convert slake   --src DIR --out DIR
    python -m hscr_fast.data.convert pathvqa --src DIR --out DIR

Each writes `OUT/train.json`, `OUT/test.json` (and `OUT/validate.json` where the source has a validation split),
`OUT/images/` holding the images the records use (hard links when the filesystem allows, else copies; `--copy`
forces copies: a hard link is the source file itself, so editing it in place would edit the release too),
and `OUT/conversion_report.json` with counts and the reasons records were skipped. Use
`--image-folder OUT/images` with the JSON files. Sources, as released:

* VQA-RAD (the MEVF split): `trainset.json`, `testset.json`, `images/synpic*.jpg`.
* SLAKE: `train.json`, `validate.json`, `test.json`, `imgs/xmlabN/source.jpg`. English questions only
  (`q_lang == "en"`); the image paths keep their `xmlabN/` folder, since every image is called `source.jpg`.
* PathVQA (the authors' `pvqa` folder): `qas/{train,val,test}/{split}_qa.pkl` — lists of
  `{"image": "train_0422", "question", "answer"}` — and `images/{train,val,test}/train_0422.jpg`. A `{split}_qa.json`
  with the same list may stand in for the pickle. `--src` may be the `pvqa` folder or its parent. The `val` split is
  written as `validate.json`. PathVQA has no answer types: yes/no answers are CLOSED, all others OPEN.

Normalisation: answers are stripped, runs of whitespace collapsed, numbers turned into strings, and yes/no answers
lower-cased (sources mix "Yes" and "yes"; other answers keep their case, e.g. "CT"). `answer_type` is CLOSED/OPEN
whatever its case or stray whitespace; where a source gives none it is inferred from the answer as for PathVQA.
Records with a missing or unreadable image, an empty question or answer, an unknown answer type, or (SLAKE) a
non-English question are skipped and counted by reason, never fatal. Record ids are `"{dataset}-{split}-{index}"`,
the index being the record's position in its source file.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from hscr_fast.data.images import ImageLoadError, validate_image
from hscr_fast.data.records import (
    BadRecord,
    DataFormatError,
    SkipReason,
    VQARecord,
    count_skip_reasons,
    normalize_answer_type,
    read_json_list,
    write_llava_med_json,
)
from hscr_fast.runtime.errors import exit_code_of
from hscr_fast.runtime.io import atomic_write_json

_YES_NO = ("yes", "no")
_EXAMPLES_PER_REASON = 5
_PATHVQA_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class SourceQA:
    """One question-answer pair as the source has it, before validation. `image` is relative to the image root."""

    index: int
    image: Any
    question: Any
    answer: Any
    answer_type: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceSplit:
    """A split of a source dataset: where it came from, its QA pairs, and records dropped before validation."""

    name: str
    source_file: Path
    items: list[SourceQA]
    filtered: list[SkipReason] = field(default_factory=list)


@dataclass
class SplitResult:
    name: str
    source_file: Path
    records: list[VQARecord]
    skipped: list[SkipReason]

    def summary(self) -> dict[str, Any]:
        examples = {}
        for skip in self.skipped:
            examples.setdefault(skip.reason, [])
            if len(examples[skip.reason]) < _EXAMPLES_PER_REASON:
                examples[skip.reason].append(skip.message)
        return {"source_file": str(self.source_file), "written": len(self.records),
                "skipped": count_skip_reasons(self.skipped), "skip_examples": examples}


@dataclass
class ConversionReport:
    dataset: str
    source: Path
    out: Path
    splits: dict[str, SplitResult]
    num_images: int
    image_method: str

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "source": str(self.source), "out": str(self.out),
                "images": {"count": self.num_images, "method": self.image_method},
                "splits": {name: split.summary() for name, split in self.splits.items()}}

    def format(self) -> str:
        lines = [f"{self.dataset}: {self.source} -> {self.out} ({self.num_images} images, {self.image_method})"]
        for name, split in self.splits.items():
            counts = count_skip_reasons(split.skipped)
            skipped = ", ".join(f"{reason}: {n}" for reason, n in counts.items()) or "none"
            lines.append(f"  {name}.json: {len(split.records)} records written; "
                         f"skipped {len(split.skipped)} ({skipped})")
            for reason, messages in split.summary()["skip_examples"].items():
                if reason != "non-English":  # expected filtering, not a data problem worth listing
                    lines.extend(f"    {message}" for message in messages)
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Normalisation shared by all datasets


def normalize_answer(value: Any) -> str:
    """Answer text: numbers become strings ("2", "0.5"), whitespace is collapsed, yes/no lower-cased. Raises
    ValueError for a missing, empty or non-text answer."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"answer must be text or a number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"answer must be text or a number, got {type(value).__name__}")
    text = " ".join(str(value).split())
    if not text:
        raise ValueError("answer is empty")
    return text.lower() if text.lower() in _YES_NO else text


def infer_answer_type(answer: str) -> str:
    """CLOSED for a yes/no answer, OPEN otherwise (the PathVQA convention)."""
    return "CLOSED" if answer.lower() in _YES_NO else "OPEN"


def _to_record(item: SourceQA, dataset: str, split: str, image_root: Path,
               check_image: Callable[[Path], str | None]) -> VQARecord:
    if not isinstance(item.image, str) or not item.image.strip():
        raise BadRecord("no image", f"no image name (got {item.image!r})")
    if Path(item.image).is_absolute() or ".." in Path(item.image).parts:
        # the path is reused under OUT/images/, so it must stay inside that folder
        raise BadRecord("bad image path", f"image path must be relative and inside the image folder: {item.image!r}")
    image_path = image_root / item.image
    problem = check_image(image_path)
    if problem is not None:
        reason = "missing image" if problem == "missing" else "unreadable image"
        raise BadRecord(reason, f"image {image_path}: {problem}")
    question = " ".join(str(item.question).split()) if isinstance(item.question, (str, int, float)) else ""
    if not question:
        raise BadRecord("empty question", f"question is empty (got {item.question!r})")
    try:
        answer = normalize_answer(item.answer)
    except ValueError as error:
        raise BadRecord("empty answer", str(error)) from None
    try:
        answer_type = normalize_answer_type(item.answer_type)
    except ValueError as error:
        raise BadRecord("bad answer_type", str(error)) from None
    return VQARecord(id=f"{dataset}-{split}-{item.index}", image=item.image, question=question, answer=answer,
                     answer_type=answer_type or infer_answer_type(answer), metadata=item.metadata)


def _image_checker(validate_images: bool) -> Callable[[Path], str | None]:
    """A cached check per image file: None when usable, else "missing" or the decode error."""
    cache: dict[Path, str | None] = {}

    def check(path: Path) -> str | None:
        if path not in cache:
            if not path.is_file():
                cache[path] = "missing"
            elif validate_images:
                try:
                    validate_image(path)
                    cache[path] = None
                except ImageLoadError as error:
                    cache[path] = str(error).removeprefix(f"{path}: ")
            else:
                cache[path] = None
        return cache[path]

    return check


def _build_split(dataset: str, source: SourceSplit, image_root: Path,
                 check_image: Callable[[Path], str | None]) -> SplitResult:
    records, skipped = [], list(source.filtered)
    for item in source.items:
        try:
            records.append(_to_record(item, dataset, source.name, image_root, check_image))
        except BadRecord as skip:
            skipped.append(SkipReason(reason=skip.reason, record_id=str(item.index),
                                      message=f"{source.source_file}: record {item.index}: {skip.detail}"))
    return SplitResult(name=source.name, source_file=source.source_file, records=records, skipped=skipped)


# ----------------------------------------------------------------------------------------------------------------------
# Images


def _place_file(source: Path, destination: Path, use_links: bool) -> bool:
    """Put `source` at `destination` atomically, as a hard link when `use_links` and possible, else as a copy.
    Returns whether a link was made. An existing identical destination (same file, or same size and mtime) is kept,
    so re-running a conversion is cheap."""
    if destination.exists():
        if os.path.samefile(source, destination):
            return True
        source_stat, destination_stat = source.stat(), destination.stat()
        same_size = source_stat.st_size == destination_stat.st_size
        if same_size and int(source_stat.st_mtime) == int(destination_stat.st_mtime):
            return False
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    linked = False
    if use_links:
        try:
            os.link(source, temporary)
            linked = True
        except OSError:  # another filesystem, or links not permitted: fall back to copying
            pass
    if not linked:
        shutil.copy2(source, temporary)
    os.replace(temporary, destination)
    return linked


def _place_images(splits: Iterable[SplitResult], image_root: Path, out_images: Path,
                  use_links: bool) -> tuple[int, str]:
    images = sorted({record.image for split in splits for record in split.records})
    linked = 0
    for image in images:
        linked += _place_file(image_root / image, out_images / image, use_links)
    if not images:
        method = "none"
    elif linked == len(images):
        method = "hard links"
    elif linked == 0:
        method = "copies"
    else:
        method = f"{linked} hard links, {len(images) - linked} copies"
    return len(images), method


# ----------------------------------------------------------------------------------------------------------------------
# Dataset readers: each returns (image root, splits)


def _require(path: Path, dataset: str, expected: str) -> Path:
    if not path.exists():
        raise DataFormatError(f"{path}: not found; a {dataset} source folder holds {expected}")
    return path


def _clean(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def read_vqa_rad(src: Path) -> tuple[Path, list[SourceSplit]]:
    expected = "trainset.json, testset.json and images/ (the MEVF split)"
    image_root = _require(src / "images", "VQA-RAD", expected)
    splits = []
    for split, filename in (("train", "trainset.json"), ("test", "testset.json")):
        path = _require(src / filename, "VQA-RAD", expected)
        items = []
        for index, entry in enumerate(read_json_list(path, "a JSON list of VQA-RAD records")):
            entry = entry if isinstance(entry, dict) else {}
            metadata = {"qid": entry.get("qid"), "organ": _clean(entry.get("image_organ")),
                        "question_type": _clean(entry.get("question_type")),
                        "phrase_type": _clean(entry.get("phrase_type"))}
            items.append(SourceQA(index=index, image=entry.get("image_name"), question=entry.get("question"),
                                  answer=entry.get("answer"), answer_type=entry.get("answer_type"),
                                  metadata={key: value for key, value in metadata.items() if value is not None}))
        splits.append(SourceSplit(split, path, items))
    return image_root, splits


def read_slake(src: Path) -> tuple[Path, list[SourceSplit]]:
    expected = "train.json, validate.json, test.json and imgs/"
    image_root = _require(src / "imgs", "SLAKE", expected)
    splits = []
    for split in ("train", "validate", "test"):
        path = _require(src / f"{split}.json", "SLAKE", expected)
        items, filtered = [], []
        for index, entry in enumerate(read_json_list(path, "a JSON list of SLAKE records")):
            entry = entry if isinstance(entry, dict) else {}
            language = entry.get("q_lang")
            if language != "en":
                filtered.append(SkipReason("non-English", f"{path}: record {index}: q_lang is {language!r}, not 'en'",
                                           str(index)))
                continue
            metadata = {"qid": entry.get("qid"), "img_id": entry.get("img_id"),
                        "modality": _clean(entry.get("modality")), "location": _clean(entry.get("location")),
                        "question_type": _clean(entry.get("content_type")), "base_type": _clean(entry.get("base_type"))}
            items.append(SourceQA(index=index, image=entry.get("img_name"), question=entry.get("question"),
                                  answer=entry.get("answer"), answer_type=entry.get("answer_type"),
                                  metadata={key: value for key, value in metadata.items() if value is not None}))
        splits.append(SourceSplit(split, path, items, filtered))
    return image_root, splits


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only built-in containers and scalars: a pickle is a program, and a QA file needs no classes."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a PathVQA QA file should hold only "
                                     f"lists, dicts and strings")


def _read_pathvqa_qa_file(path: Path) -> list:
    if path.suffix == ".json":
        return read_json_list(path, "a JSON list of PathVQA QA records")
    try:
        with path.open("rb") as handle:
            data = _PlainDataUnpickler(handle, encoding="utf-8").load()
    except Exception as error:
        raise DataFormatError(f"{path}: cannot read the PathVQA pickle ({type(error).__name__}: {error})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a list of QA records, got {type(data).__name__}")
    return data


def _pathvqa_image(image_root: Path, split_folder: str, name: Any) -> Any:
    """`train_0422` -> `train/train_0422.jpg` (the first suffix that exists; `.jpg` when none does, so the record is
    reported as a missing image)."""
    if not isinstance(name, str) or not name.strip():
        return name
    name = name.strip()
    if Path(name).suffix.lower() in _PATHVQA_IMAGE_SUFFIXES:
        return f"{split_folder}/{name}"
    for suffix in _PATHVQA_IMAGE_SUFFIXES:
        if (image_root / split_folder / f"{name}{suffix}").is_file():
            return f"{split_folder}/{name}{suffix}"
    return f"{split_folder}/{name}.jpg"


def read_pathvqa(src: Path) -> tuple[Path, list[SourceSplit]]:
    root = src / "pvqa" if not (src / "qas").is_dir() and (src / "pvqa" / "qas").is_dir() else src
    expected = "qas/{train,val,test}/{split}_qa.pkl (or .json) and images/{train,val,test}/"
    image_root = _require(root / "images", "PathVQA", expected)
    splits = []
    for source_split, split in (("train", "train"), ("val", "validate"), ("test", "test")):
        candidates = [root / "qas" / source_split / f"{source_split}_qa{suffix}" for suffix in (".pkl", ".json")]
        path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if path is None:
            if split == "validate":
                continue  # optional
            raise DataFormatError(f"{candidates[0]}: not found (nor {candidates[1].name}); a PathVQA source folder "
                                  f"holds {expected}")
        items = []
        for index, entry in enumerate(_read_pathvqa_qa_file(path)):
            entry = entry if isinstance(entry, dict) else {}
            metadata = {key: value for key, value in entry.items()
                        if key not in ("image", "question", "answer", "answer_type")
                        and isinstance(value, (str, int, float, bool))}
            items.append(SourceQA(index=index, image=_pathvqa_image(image_root, source_split, entry.get("image")),
                                  question=entry.get("question"), answer=entry.get("answer"),
                                  answer_type=entry.get("answer_type"), metadata=metadata))
        splits.append(SourceSplit(split, path, items))
    return image_root, splits


READERS: dict[str, Callable[[Path], tuple[Path, list[SourceSplit]]]] = {
    "vqa-rad": read_vqa_rad,
    "slake": read_slake,
    "pathvqa": read_pathvqa,
}


# ----------------------------------------------------------------------------------------------------------------------


def convert(dataset: str, src: str | os.PathLike, out: str | os.PathLike, *, use_links: bool = True,
            validate_images: bool = True) -> ConversionReport:
    """Convert the `dataset` release in `src` into LLaVA-Med JSON files and an image folder under `out`.

    Images are checked once each (exists, and with `validate_images` fully decodes). Images are placed before the
    JSON files are written, and every file is written atomically, so an interrupted run never leaves a JSON file that
    points at images not yet there.
    """
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(READERS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataFormatError(f"{src}: source folder not found")
    image_root, source_splits = READERS[dataset](src)
    check_image = _image_checker(validate_images)
    splits = {source.name: _build_split(dataset, source, image_root, check_image) for source in source_splits}
    out.mkdir(parents=True, exist_ok=True)
    num_images, image_method = _place_images(splits.values(), image_root, out / "images", use_links)
    for split in splits.values():
        write_llava_med_json(out / f"{split.name}.json", split.records)
    report = ConversionReport(dataset, src, out, splits, num_images, image_method)
    atomic_write_json(out / "conversion_report.json", report.to_json())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hscr_fast.data.convert",
                                     description="Convert a public Med-VQA release to LLaVA-Med JSON + images/.")
    parser.add_argument("dataset", choices=sorted(READERS))
    parser.add_argument("--src", required=True, help="the dataset's release folder")
    parser.add_argument("--out", required=True, help="output folder (train.json, test.json, images/, ...)")
    parser.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")
    parser.add_argument("--no-validate-images", action="store_true",
                        help="only check that images exist, do not decode them (faster)")
    args = parser.parse_args(argv)

    def body() -> None:
        report = convert(args.dataset, args.src, args.out, use_links=not args.copy,
                         validate_images=not args.no_validate_images)
        print(report.format())

    return exit_code_of(body)


if __name__ == "__main__":
    sys.exit(main())
