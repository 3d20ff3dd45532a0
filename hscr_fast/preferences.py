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

from .data.images import ImageLoadError, load_image, validate_image
from .data.records import DataFormatError, PreferenceRecord, load_preference_jsonl
from .listwise import ListwiseExample
from .models.prompting import PromptTokens


@dataclass
class TokenizedPreference:
    id: str
    image_path: Path
    prompt: PromptTokens
    responses: list[list[int]]  # [y_w, y_l1, ...], EOS included
    weight: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.prompt.num_text_tokens + sum(len(r) for r in self.responses)


def validate_preferences(path: str | Path, image_folder: str | Path) -> list[PreferenceRecord]:
    """Every line parses and every image exists and decodes; otherwise one error listing each problem by line."""
    records, _ = load_preference_jsonl(path, image_folder, on_error="raise")
    if not records:
        raise DataFormatError(f"{path}: no preference lists in the file")
    problems = []
    for line_number, record in enumerate(records, start=1):
        try:
            validate_image(Path(image_folder) / record.image)
        except ImageLoadError as error:
            problems.append(f"  record {line_number} (id {record.id!r}): {error}")
    if problems:
        raise DataFormatError(f"{path}: {len(problems)} image(s) cannot be used:\n" + "\n".join(problems[:20]))
    return records


def tokenize_preferences(vlm, records: list[PreferenceRecord], image_folder: str | Path, *,
                         max_answer_tokens: int = 512) -> list[TokenizedPreference]:
    items = []
    for record in records:
        prompt = vlm.prompt_tokens(record.prompt)
        responses = [vlm.answer_tokens(prompt, text) for text in record.responses]
        longest = max(len(r) for r in responses)
        if longest > max_answer_tokens:
            raise DataFormatError(f"preference id {record.id!r}: a response has {longest} tokens, more than "
                                  f"--max-answer-tokens {max_answer_tokens}; shorten it or raise the limit")
        items.append(TokenizedPreference(record.id, Path(image_folder) / record.image, prompt, responses,
                                         record.weight))
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


def to_examples(vlm, items: list[TokenizedPreference], *, responses: slice = slice(None)) -> list[ListwiseExample]:
    """Loads the images, runs the vision tower once for the batch, and pairs each prompt with its visual tokens."""
    images = [load_image(item.image_path) for item in items]
    visual = vlm.encode_images(vlm.preprocess_images(images))
    return [ListwiseExample(item.prompt, item.responses[responses], visual[i]) for i, item in enumerate(items)]
