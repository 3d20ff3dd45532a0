"""Preference lists ready for the listwise forward: validated up front, tokenised once, batched deterministically.

Validation happens before any model loads, so a bad line or a missing/corrupt image is reported (with its line
number) in seconds, not after minutes of model loading.

Batch order depends only on (seed, epoch): epoch e visits a permutation drawn from a generator seeded with
seed + e; global step s takes the s-th slice of `world_size · per_device_batch` prompts, and rank r takes its own
`per_device_batch` of them. The last incomplete global batch of an epoch is dropped, so every rank always holds a
full batch and a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hscr_fast.data.images import ImageLoadError, ImageOutsideFolderError, image_in_folder, load_image, validate_image
from hscr_fast.data.records import DataFormatError, PreferenceRecord, load_preference_jsonl
from hscr_fast.listwise import ListwiseExample
from hscr_fast.models.prompting import MARK_OPEN, PromptTokens


@dataclass
class TokenizedPreference:
    id: str
    image_path: Path | None  # None: a text-only list
    prompt: PromptTokens
    responses: list[list[int]]  # [y_w, y_l1, ...], EOS included
    weight: float | None = None
    # One image per response when the list contrasts images (image-side dispreference); None: all see `image_path`.
    response_images: list[Path] | None = None
    kind: str = "text"
    # Per response and token: inside a `<mask>…</mask>` span of the record's text. None when nothing is marked.
    marked: list[list[bool]] | None = None

    def image_of(self, response_index: int) -> Path | None:
        return self.image_path if self.response_images is None else self.response_images[response_index]

    @property
    def num_tokens(self) -> int:
        return self.prompt.num_text_tokens + sum(len(r) for r in self.responses)


def response_images(record: PreferenceRecord) -> list[str] | None:
    """The optional `response_images` field: one image path per response, or None."""
    images = record.metadata.get("response_images")
    if images is None:
        return None
    if not isinstance(images, list) or len(images) != len(record.responses) or \
            not all(isinstance(name, str) and name for name in images):
        raise DataFormatError(f"preference id {record.id!r}: 'response_images' must list one image path per response "
                              f"({len(record.responses)}), got {images!r}")
    return images


def validate_preferences(path: str | Path, image_folder: str | Path | None, *,
                         allow_images_outside_folder: bool = False) -> list[PreferenceRecord]:
    """Every line parses and every image exists inside the image folder (unless `allow_images_outside_folder`) and
    decodes; otherwise one error listing each problem by line. `image_folder` None: the lists are for a text-only
    model, and a record with an image is an error."""
    records, _ = load_preference_jsonl(path, image_folder, on_error="raise",
                                       allow_images_outside_folder=allow_images_outside_folder)
    if not records:
        raise DataFormatError(f"{path}: no preference lists in the file")
    problems = []
    for line_number, record in enumerate(records, start=1):
        if image_folder is None:
            if record.image is not None or response_images(record) is not None:
                problems.append(f"  record {line_number} (id {record.id!r}): has an image, but the model is "
                                "text-only; use a vision-language model or lists without images")
            continue
        if record.image is None:
            problems.append(f"  record {line_number} (id {record.id!r}): no image; a vision-language model needs "
                            "one per preference list")
            continue
        try:
            for name in dict.fromkeys([record.image] + (response_images(record) or [])):
                validate_image(image_in_folder(image_folder, name, allow_outside=allow_images_outside_folder))
        except (ImageLoadError, ImageOutsideFolderError, DataFormatError) as error:
            problems.append(f"  record {line_number} (id {record.id!r}): {error}")
    if problems:
        raise DataFormatError(f"{path}: {len(problems)} record(s) cannot be used:\n" + "\n".join(problems[:20]))
    return records


def tokenize_preferences(vlm, records: list[PreferenceRecord], image_folder: str | Path | None, *,
                         max_answer_tokens: int = 512) -> list[TokenizedPreference]:
    items = []
    for record in records:
        prompt = vlm.prompt_tokens(record.prompt)
        marked = None
        try:
            if any(MARK_OPEN in text for text in record.responses):
                tokenized = [vlm.marked_answer_tokens(prompt, text) for text in record.responses]
                responses, marked = [ids for ids, _ in tokenized], [flags for _, flags in tokenized]
            else:
                responses = [vlm.answer_tokens(prompt, text) for text in record.responses]
        except ValueError as error:
            raise DataFormatError(f"preference id {record.id!r}: {error}") from None
        longest = max(len(r) for r in responses)
        if longest > max_answer_tokens:
            raise DataFormatError(f"preference id {record.id!r}: a response has {longest} tokens, more than "
                                  f"--max-answer-tokens {max_answer_tokens}; shorten it or raise the limit")
        images = response_images(record)
        items.append(TokenizedPreference(
            record.id, None if record.image is None else Path(image_folder) / record.image, prompt, responses,
            record.weight,
            None if images is None else [Path(image_folder) / name for name in images],
            str(record.metadata.get("kind", "text")), marked))
    return items


def steps_per_epoch(num_items: int, per_device_batch: int, world_size: int) -> int:
    return num_items // (per_device_batch * world_size)


def batch_indices(num_items: int, *, epoch: int, step_in_epoch: int, per_device_batch: int, world_size: int,
                  rank: int, seed: int) -> list[int]:
    """The dataset indices rank `rank` trains on at this step (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_items, generator=generator)
    global_batch = per_device_batch * world_size
    start = step_in_epoch * global_batch + rank * per_device_batch
    return order[start:start + per_device_batch].tolist()


def to_examples(vlm, items: list[TokenizedPreference]) -> list[ListwiseExample]:
    """Loads the batch's distinct images, runs the vision tower once over them, and builds one example per
    (prompt, image): responses that see the same image share one prefix; row b of the output is item b. Text-only
    lists give one example each, the prompt alone as the prefix."""
    if all(item.image_path is None for item in items):
        return [ListwiseExample(item.prompt, item.responses, token_flags=item.marked) for item in items]
    distinct = list(dict.fromkeys(item.image_of(j) for item in items for j in range(len(item.responses))))
    pixels = vlm.preprocess_images([load_image(path) for path in distinct])
    visual, layouts = vlm.encode_images(pixels), vlm.visual_layouts(pixels)
    image_row = {path: index for index, path in enumerate(distinct)}
    examples = []
    for row, item in enumerate(items):
        by_image: dict[Path, list[int]] = {}
        for j in range(len(item.responses)):
            by_image.setdefault(item.image_of(j), []).append(j)
        for path, slots in by_image.items():
            examples.append(ListwiseExample(
                item.prompt, [item.responses[j] for j in slots], visual[image_row[path]], output_row=row,
                output_slots=slots, token_flags=None if item.marked is None else [item.marked[j] for j in slots],
                visual_layout=None if layouts is None else layouts[image_row[path]]))
    return examples
