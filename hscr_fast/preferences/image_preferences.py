"""`python -m hscr_fast.preferences.image_preferences`: image-side preference records — the data's own answer under the
clean
image (preferred) against the same answer under a copy of the image whose lesion region is corrupted (dispreferred),
as in MMedPO's lesion-region dispreference and the fine-grained method's visual-contrastive pairs.

    python -m hscr_fast.preferences.image_preferences --source phantom --data demo/train.json --image-folder
    demo/images \\
        --out image_prefs.jsonl --out-images image_prefs.images --mode replace --seed 0
    python -m hscr_fast.preferences.image_preferences --source slake --data slake_llava/train.json \\
        --image-folder slake_llava/images --annotation-folder ../shared/data/slake/imgs --out slake_image_prefs.jsonl

Lesion regions (`hscr_fast.preferences.corruption`):
- `--source phantom`: each record's `"mask"` (a file under --mask-folder, default the `masks/` folder beside the image
  folder; every nonzero pixel is lesion) or, without a mask, the `bbox` of each entry of its `"lesions"`.
- `--source slake`: the image's SLAKE folder `--annotation-folder/xmlabN/` (the record's image is `xmlabN/source.jpg`;
  the converter copies only the images, so point this at the release's `imgs/`): `mask.png` where it is a label mask,
  else the `detection.json` boxes; `--labels` picks the lesion labels (default: every label that is not a normal organ,
  `corruption.SLAKE_ORGAN_LABELS`).
`--margin` grows every box by that many pixels (masks are used as they are).

Corrupted images: one per source image (every question about an image shares it), seeded by
`sample_seed(--seed, image path)` (`hscr_fast.models.dropout`), written as lossless PNG — a JPEG would change the
pixels outside the region — atomically, to `--out-images/<image path without extension>.<mode>-<fingerprint>.png`.
An image already there (same name, hence same arguments) is not rewritten.

Files, for `--out prefs.jsonl`:
- `prefs.jsonl`, one line per question:
  `{"id", "image", "prompt", "responses": [answer, answer], "response_images": [clean, corrupted],
  "kind": "image-dispreference", "corruption": {"mode", "sigma", "fill_mean", "seed", "global_seed", "region_pixels",
  "region_source", "region_labels", "region_resized_from"}, "answer_type"?, "args_fingerprint"}`.
  `response_images` holds one image per response, aligned with `responses`; `image` is the preferred response's image,
  as in every preference file. Paths are relative to --image-folder like `image`; the corrupted one is absolute when
  --out-images lies outside the image folder (choose `--out-images IMAGE_FOLDER/some_dir` for a relocatable set). A
  trainer shares the visual tokens and the prompt prefix only among responses with the same image. `seed` is the
  per-image seed given to `corruption.corrupt_region`; `sigma` and `fill_mean` are the values used (resolved from the
  image's statistics when not given).
- `prefs.skipped.jsonl`: `{id, image, reason, message, args_fingerprint}` for every question left out: no_lesion,
  no_annotation, missing_mask, bad_annotation, empty_region, missing_image, unreadable_image, bad_image_path.
- `prefs.summary.json`: counts (read, selected, written, skipped by reason), images corrupted, region fallbacks, args.

Resuming: lines are appended and flushed one by one (`JsonlAppender`, which drops a torn last line); a re-run reads
the finished ids (written or skipped) and does the rest, so the output is byte-identical to an uninterrupted run.
Resuming output made with other region or noise arguments is refused. A skipped question counts as finished: to
retry it (say, after restoring its mask), delete its line from the skip file. --num-samples N takes the first N records
the reader accepts (0 = all); records the reader rejects are counted in the summary with their messages.
"""
from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hscr_fast.runtime.errors import HscrError, exit_code_of
from hscr_fast.runtime.flags import flag_parser, parse_flags, setting
from hscr_fast.runtime.io import (
    JsonlAppender,
    OutputFiles,
    atomic_output,
    atomic_write_json,
    read_jsonl,
)
from hscr_fast.runtime.resume import check_same_arguments, fingerprint_of

KIND = "image-dispreference"
SOURCES = ("phantom", "slake")
FINGERPRINT_ARGS = ("source", "mode", "sigma", "fill_mean", "seed", "labels", "margin")


@dataclass
class ImagePreferencesConfig:
    """Every flag of the command (`--help` groups them: what to read and write, how to corrupt)."""

    data: str = field(metadata={"help": "LLaVA-Med JSON list with lesion annotations"})
    image_folder: str | None = setting(None, "folder the data's image paths are relative to (default: the data's "
                                             "folder)")
    source: str = setting("auto", "where lesion regions come from (auto = phantom when the records carry "
                                  "'mask'/'lesions', else slake)", choices=(*SOURCES, "auto"))
    mask_folder: str | None = setting(None, "phantom: folder of the records' 'mask' files (default: "
                                            "IMAGE_FOLDER/../masks)")
    annotation_folder: str | None = setting(None, "slake: folder holding xmlabN/detection.json and mask.png "
                                                  "(default: the image folder)")
    out: str = setting("image_preferences.jsonl", "output JSONL")
    out_images: str | None = setting(None, "folder for the corrupted images (default: OUT without .jsonl + "
                                           "'.images')")
    num_samples: int = setting(0, "use the first N valid records (0 = all)")
    mode: str = setting("replace", "replace: region := N(fill_mean, sigma^2) (MMedPO); add: region += N(0, sigma^2)",
                        choices=("replace", "add"))
    sigma: float | None = setting(None, "noise standard deviation in 8-bit levels (default: the image's own outside "
                                        "the region)")
    fill_mean: float | None = setting(None, "replace: noise mean (default: the image's per-channel mean outside the "
                                            "region; MMedPO's script uses 0 with sigma 10)")
    seed: int = setting(0, "global seed; each image's seed is derived from it")
    labels: str | None = setting(None, "slake: comma-separated lesion labels (default: every non-organ label)")
    margin: int = setting(0, "pixels added around every lesion box")


def build_parser():
    return flag_parser(ImagePreferencesConfig, prog="python -m hscr_fast.preferences.image_preferences",
                       description="Write image-side preference records: the same answer under the clean image "
                                   "(preferred) and under a lesion-corrupted copy (dispreferred).")


# -- files ------------------------------------------------------------------------------------------------------------
class OutputPaths(OutputFiles):
    @property
    def default_images(self) -> Path:
        return self.stem.with_name(self.stem.name + ".images")


def args_fingerprint(args) -> str:
    """16 hex digits identifying everything that decides a record's content (not the paths or --num-samples)."""
    return fingerprint_of({name: getattr(args, name) for name in FINGERPRINT_ARGS})


def finished_ids(path: Path, fingerprint: str) -> set[str]:
    """Ids already in `path`; refuses a file made with other arguments. Call after opening the file with
    JsonlAppender, which repairs a torn last line."""
    if not path.is_file():
        return set()
    done = set()
    for line in read_jsonl(path):
        check_same_arguments(path, line, fingerprint)
        done.add(str(line["id"]))
    return done


# -- one image --------------------------------------------------------------------------------------------------------
class Skip(Exception):
    """A question left out: `reason` (a category to count) and a one-line `message`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class CorruptedImage:
    reference: str  # the corrupted image as written in records (relative to the image folder, or absolute)
    corruption: dict
    written: bool  # False when the file was already there


def phantom_region(record, mask_folder: Path, size: tuple[int, int], margin: int):
    """The record's lesion region (`corruption.LesionRegion`) from its 'mask', else its lesions' boxes."""
    from hscr_fast.preferences.corruption import LesionRegion, phantom_lesion_region, region_mask_from_boxes

    lesions, mask_name = record.metadata.get("lesions"), record.metadata.get("mask")
    if lesions is None and mask_name is None:
        raise Skip("no_annotation", "the record has neither 'mask' nor 'lesions' (not a phantom record?)")
    if lesions is not None and not (isinstance(lesions, list) and all(isinstance(item, dict) for item in lesions)):
        raise Skip("bad_annotation", f"'lesions' must be a list of objects, got {lesions!r}")
    if lesions == []:
        raise Skip("no_lesion", "the image has no lesion ('lesions' is empty)")
    if mask_name is not None:
        mask_path = mask_folder / str(mask_name)
        if not mask_path.is_file():
            raise Skip("missing_mask", f"mask file not found: {mask_path} (set --mask-folder)")
        try:
            return LesionRegion(phantom_lesion_region(mask_path), "mask", ())
        except ValueError as error:
            raise Skip("bad_annotation", str(error)) from None
    try:
        boxes = [lesion["bbox"] for lesion in lesions]
        return LesionRegion(region_mask_from_boxes(size, boxes, margin=margin), "lesions.bbox", ())
    except (KeyError, ValueError) as error:
        raise Skip("bad_annotation", f"lesion boxes unusable: {error}") from None


def slake_region(record, annotation_folder: Path, size: tuple[int, int], labels, margin: int):
    """The lesion region (`corruption.LesionRegion`) of the record's SLAKE folder ANNOTATION_FOLDER/xmlabN/."""
    from hscr_fast.preferences.corruption import EmptyRegionError, slake_lesion_region

    image_dir = annotation_folder / Path(record.image).parent
    try:
        return slake_lesion_region(image_dir, labels=labels, size=size, margin=margin)
    except FileNotFoundError as error:
        raise Skip("no_annotation", f"{error} (set --annotation-folder to SLAKE's imgs/)") from None
    except EmptyRegionError as error:
        raise Skip("no_lesion", str(error)) from None
    except ValueError as error:
        raise Skip("bad_annotation", str(error)) from None


class ImageCorrupter:
    """Corrupts each source image once (cached by image path) and writes it; failures are cached as `Skip`s too."""

    def __init__(self, args, image_folder: Path, out_images: Path, fingerprint: str):
        self.args = args
        self.image_folder = image_folder
        self.out_images = out_images
        self.fingerprint = fingerprint
        self.labels = None if args.labels is None else [label for label in args.labels.split(",") if label.strip()]
        self.mask_folder = Path(args.mask_folder) if args.mask_folder else image_folder.parent / "masks"
        self.annotation_folder = Path(args.annotation_folder) if args.annotation_folder else image_folder
        self.cache: dict[str, CorruptedImage | Skip] = {}
        self.notes: list[str] = []

    def __call__(self, record) -> CorruptedImage:
        if record.image not in self.cache:
            try:
                self.cache[record.image] = self._corrupt(record)
            except Skip as skip:
                self.cache[record.image] = skip
        outcome = self.cache[record.image]
        if isinstance(outcome, Skip):
            raise outcome
        return outcome

    def output_path(self, image: str) -> Path:
        relative = Path(image)
        return self.out_images / relative.parent / f"{relative.stem}.{self.args.mode}-{self.fingerprint[:8]}.png"

    def reference(self, path: Path) -> str:
        """How records name `path`: relative to the image folder when inside it, else absolute."""
        absolute, folder = path.absolute(), self.image_folder.absolute()
        return absolute.relative_to(folder).as_posix() if absolute.is_relative_to(folder) else str(absolute)

    def _corrupt(self, record) -> CorruptedImage:
        from hscr_fast.data.images import ImageLoadError, load_image
        from hscr_fast.models.dropout import sample_seed
        from hscr_fast.preferences.corruption import apply_region_noise

        relative = Path(record.image)
        if relative.is_absolute() or ".." in relative.parts:
            raise Skip("bad_image_path", f"image path must be relative and inside --image-folder: {record.image!r}")
        image_path = self.image_folder / relative
        if not image_path.is_file():
            raise Skip("missing_image", f"image file not found: {image_path}")
        try:
            image = load_image(image_path)
        except ImageLoadError as error:
            raise Skip("unreadable_image", str(error)) from None
        if self.args.source == "phantom":
            region = phantom_region(record, self.mask_folder, image.size, self.args.margin)
        else:
            region = slake_region(record, self.annotation_folder, image.size, self.labels, self.args.margin)
        if region.note:
            self.notes.append(f"{record.image}: {region.note}")
        if not region.mask.any():
            raise Skip("empty_region", f"the lesion region of {record.image} ({region.source}) has no pixel")

        seed = sample_seed(self.args.seed, record.image)  # per image: every question about it shares the copy
        result = apply_region_noise(image, region.mask, mode=self.args.mode, sigma=self.args.sigma, seed=seed,
                                    fill_mean=self.args.fill_mean)
        path = self.output_path(record.image)
        written = not path.is_file()  # same name = same arguments = same bytes
        if written:
            with atomic_output(path) as temporary:
                result.image.save(temporary, format="PNG")
        corruption = {"mode": result.mode, "sigma": result.sigma,
                      "fill_mean": None if result.fill_mean is None else list(result.fill_mean),
                      "seed": result.seed, "global_seed": self.args.seed, "region_pixels": result.region_pixels,
                      "region_source": region.source, "region_labels": list(region.labels),
                      "region_resized_from": None if result.region_resized_from is None
                      else list(result.region_resized_from)}
        return CorruptedImage(self.reference(path), corruption, written)


# -- the command ------------------------------------------------------------------------------------------------------
def preference_line(record, corrupted: CorruptedImage, fingerprint: str) -> dict:
    line = {"id": record.id, "image": record.image, "prompt": record.question,
            "responses": [record.answer, record.answer], "response_images": [record.image, corrupted.reference],
            "kind": KIND, "corruption": corrupted.corruption}
    if record.answer_type is not None:
        line["answer_type"] = record.answer_type
    line["args_fingerprint"] = fingerprint
    return line


def skip_line(record, skip: Skip, fingerprint: str) -> dict:
    return {"id": record.id, "image": record.image, "reason": skip.reason, "message": skip.message,
            "args_fingerprint": fingerprint}


def detect_source(records) -> str:
    return "phantom" if any("mask" in r.metadata or "lesions" in r.metadata for r in records) else "slake"


def validate_args(args) -> None:
    problems = []
    if args.num_samples < 0:
        problems.append(f"--num-samples must be >= 0, got {args.num_samples}")
    if args.margin < 0:
        problems.append(f"--margin must be >= 0, got {args.margin}")
    if args.sigma is not None and not (np.isfinite(args.sigma) and args.sigma >= 0):
        problems.append(f"--sigma must be a finite number >= 0, got {args.sigma}")
    if args.seed < 0:
        problems.append(f"--seed must be >= 0, got {args.seed}")
    if args.fill_mean is not None and args.mode != "replace":
        problems.append("--fill-mean applies to --mode replace only")
    if args.labels is not None and args.source == "phantom":
        problems.append("--labels applies to --source slake only (phantom masks mark lesions only)")
    if problems:
        raise HscrError("; ".join(problems))


def run(args) -> dict:
    from tqdm import tqdm

    from hscr_fast.data.records import load_llava_med_json

    validate_args(args)
    data_path = Path(args.data)
    image_folder = Path(args.image_folder) if args.image_folder else data_path.parent
    records, input_skips = load_llava_med_json(data_path, on_error="skip")
    selected = records[:args.num_samples] if args.num_samples else records
    if args.source == "auto":
        args.source = detect_source(selected)
        validate_args(args)  # again: some checks depend on the source
    paths = OutputPaths(Path(args.out))
    out_images = Path(args.out_images) if args.out_images else paths.default_images
    fingerprint = args_fingerprint(args)
    corrupter = ImageCorrupter(args, image_folder, out_images, fingerprint)

    with JsonlAppender(paths.out) as record_out, JsonlAppender(paths.skipped) as skip_out:
        done = finished_ids(paths.out, fingerprint) | finished_ids(paths.skipped, fingerprint)
        todo = [record for record in selected if record.id not in done]
        for record in tqdm(todo, unit="sample", desc="image preferences", dynamic_ncols=True,
                           disable=not sys.stderr.isatty()):
            try:
                record_out.append(preference_line(record, corrupter(record), fingerprint))
            except Skip as skip:
                skip_out.append(skip_line(record, skip, fingerprint))

    written, skipped = read_jsonl(paths.out), read_jsonl(paths.skipped)
    selected_ids = {record.id for record in selected}
    skipped = [line for line in skipped if line["id"] in selected_ids]
    outcomes = [outcome for outcome in corrupter.cache.values() if isinstance(outcome, CorruptedImage)]
    summary = {
        "read": len(records) + len(input_skips),
        "rejected_by_reader": dict(Counter(skip.reason for skip in input_skips).most_common()),
        "rejected_messages": [skip.message for skip in input_skips[:20]],
        "selected": len(selected),
        "written": sum(line["id"] in selected_ids for line in written),
        "skipped": dict(Counter(line["reason"] for line in skipped).most_common()),
        "skipped_total": len(skipped),
        "processed_this_run": len(todo),
        "images_corrupted_this_run": sum(outcome.written for outcome in outcomes),
        "images_reused": sum(not outcome.written for outcome in outcomes),
        "region_notes": corrupter.notes[:20],
        "region_notes_total": len(corrupter.notes),
        "output": str(paths.out),
        "skipped_file": str(paths.skipped),
        "out_images": str(out_images),
        "args_fingerprint": fingerprint,
        "args": {**dataclasses.asdict(args), "image_folder": str(image_folder), "out_images": str(out_images)},
    }
    atomic_write_json(paths.summary, summary)
    return summary


def format_summary(summary: dict) -> str:
    skipped = ", ".join(f"{reason} {count}" for reason, count in summary["skipped"].items()) or "none"
    return (f"read {summary['read']}, selected {summary['selected']}, written {summary['written']}, skipped "
            f"{summary['skipped_total']} ({skipped}); {summary['images_corrupted_this_run']} corrupted images written "
            f"this run, {summary['region_notes_total']} region fallback note(s)\n"
            f"  → {summary['output']}\n  → {summary['skipped_file']}\n  → {summary['out_images']}/")


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        (args,) = parse_flags(build_parser(), argv)
        summary = run(args)
        print(format_summary(summary))
        print(f"  → {OutputPaths(Path(args.out)).summary}")

    return exit_code_of(body)


if __name__ == "__main__":
    sys.exit(main())
