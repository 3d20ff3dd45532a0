"""The demo world: the phantom Med-VQA dataset plus a tiny LLaVA SFT-trained on it, built once and cached on disk.

Every hscr_fast command falls back to it when given no model or data (`from hscr_fast.demo import ensure_demo_world`).
`ensure_demo_world()` builds, from nothing, on the CPU:

1. the phantom dataset (`hscr_fast.demo.phantom`) under `ROOT/data`;
2. a tiny real-architecture LLaVA (CLIP vision tower + MLP projector + Mistral decoder, `hscr_fast.models.tiny`) whose
   tokenizer is trained on the phantom questions and answers;
3. a ~20-s warm-up of the vision tower on the phantom's lesion masks (the stand-in for CLIP pretraining; why it is
   needed: `hscr_fast.demo.sft`), then SFT of every parameter on the phantom training questions;
4. greedy answers to the first test questions of each split (history agreeing with the image, history conflicting
   with it) with and without the visual tokens, and a question-only baseline;
5. the checkpoint under `ROOT/model` (transformers `save_pretrained` model + processor + the `hscr_fast.json` sidecar),
   written in a temporary sibling directory and moved into place with `os.replace`;
6. `ROOT/world.json`, written last: the preset's fingerprint, the SFT report and the SHA-256 of the trained weights
   (what to compare when two builds' numbers differ). Its presence with a matching
   fingerprint is what "complete" means, so a later call is a no-op and an interrupted build is redone.

A file lock (`ROOT/.lock`) serialises concurrent builders (several torchrun ranks falling back to the demo at once):
the first builds, the others wait and then find the world complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hscr_fast.demo.sft import SFTConfig, VisionWarmupConfig
from hscr_fast.runtime.io import atomic_directory, atomic_write_json

WORLD_VERSION = 2  # bump when the recipe changes in a way the preset fields do not capture
MANIFEST_NAME = "world.json"
ENV_ROOT = "HSCR_DEMO_DIR"
# The demo model's longest answer, a two-finding report, is ~19 tokens with EOS; the limit leaves room for a model that
# states a finding too many.
MAX_NEW_TOKENS = 32
# The test set's two halves (`hscr_fast.demo.phantom`): the record field `prior` → the split's name in reports.
SPLITS = {"prior-agreeing": "agrees", "prior-conflicting": "conflicts"}
PRIOR_CONFLICTING_SPLIT = "prior-conflicting"
# Files `save_pretrained` + the sidecar must have produced for the checkpoint to count as complete.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "hscr_fast.json")


@dataclass(frozen=True)
class DemoPreset:
    """Everything that decides the world's contents; all of it goes into the fingerprint."""

    name: str
    dataset: dict[str, int]  # keyword arguments of `build_phantom_dataset`
    model: dict[str, int]  # `TinyLlavaSpec` fields (the corpus is always `phantom_corpus()`)
    vision_warmup: VisionWarmupConfig
    sft: SFTConfig
    eval_questions: int  # the first N test questions of each split are answered with and without visual tokens
    # torch threads for the build, always this many whatever the machine has: a CPU reduction split over 2 threads
    # adds in another order than one over 1, and after 500 SFT steps the worlds differ (a 1-thread build of "full"
    # answered a few test questions differently from a 2-thread one). 2 is the demo's budget of cores; the smoke
    # model's ops are too small to gain from a second thread.
    num_threads: int = 2


# "full": sized on 2 CPU cores before the clinical-history prior existed (world version 1, images only: SFT from
# random weights stayed at the question-only loss for > 2,000 steps; after the ~20-s vision warm-up, 500 steps of 32
# questions reached ~87% closed accuracy / ~95% open recall) and kept unchanged when the prior was added, so that the
# SFT budget was not chosen to make the model lean on the history. "smoke": the same pipeline at toy size, for the
# test suite; its accuracy means nothing.
PRESETS = {
    "full": DemoPreset(
        name="full",
        dataset=dict(num_train_images=1200, num_val_images=100, num_test_images=100, questions_per_image=4, seed=0,
                     image_size=84),
        model=dict(image_size=84, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=2, text_hidden=128,
                   text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=384, tokenizer_vocab=700, seed=0),
        vision_warmup=VisionWarmupConfig(steps=300, batch_size=32, learning_rate=2e-3),
        sft=SFTConfig(steps=500, batch_size=32, learning_rate=2e-3, min_learning_rate=1e-4, warmup_steps=60,
                      vision_learning_rate_scale=0.1),
        eval_questions=200,
    ),
    "smoke": DemoPreset(
        name="smoke",
        dataset=dict(num_train_images=48, num_val_images=4, num_test_images=10, questions_per_image=4, seed=0,
                     image_size=84),
        model=dict(image_size=84, patch_size=14, vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=64,
                   text_layers=1, text_heads=2, text_kv_heads=1, text_intermediate=128, tokenizer_vocab=700, seed=0),
        vision_warmup=VisionWarmupConfig(steps=20, batch_size=16, learning_rate=2e-3),
        sft=SFTConfig(steps=120, batch_size=8, learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=10),
        eval_questions=20,
        num_threads=1,
    ),
}


@dataclass(frozen=True)
class DemoWorld:
    root: Path
    model_dir: Path
    train_json: Path
    val_json: Path
    test_json: Path
    image_folder: Path
    mask_folder: Path
    sft_report: dict[str, Any] = field(default_factory=dict, compare=False)
    fingerprint: str = ""


def default_root(preset: str = "full") -> Path:
    """`$HSCR_DEMO_DIR`, else `~/.cache/hscr_fast/demo-<preset>`."""
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT]).expanduser()
    return Path.home() / ".cache" / "hscr_fast" / f"demo-{preset}"


def preset_fingerprint(preset: DemoPreset) -> str:
    """A short hash of everything that decides the world's contents, the thread count included (it changes the
    order of floating-point sums)."""
    from hscr_fast.demo.phantom import PHANTOM_VERSION, phantom_corpus

    def recipe(config) -> dict:  # the stage configs run with the preset's thread count, recorded once below
        return {k: v for k, v in dataclasses.asdict(config).items() if k != "num_threads"}

    described = {"world_version": WORLD_VERSION, "phantom_version": PHANTOM_VERSION, "preset": preset.name,
                 "dataset": preset.dataset, "model": preset.model, "vision_warmup": recipe(preset.vision_warmup),
                 "sft": recipe(preset.sft), "eval_questions": preset.eval_questions,
                 "num_threads": preset.num_threads,
                 "corpus": hashlib.sha256("\n".join(phantom_corpus()).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _world_at(root: Path, report: dict, fingerprint: str) -> DemoWorld:
    data = root / "data"
    return DemoWorld(root=root, model_dir=root / "model", train_json=data / "train.json", val_json=data / "val.json",
                     test_json=data / "test.json",
                     image_folder=data / "images", mask_folder=data / "masks", sft_report=report,
                     fingerprint=fingerprint)


def load_complete_world(root: str | os.PathLike, preset: str = "full") -> DemoWorld | None:
    """The world at `root` if it is complete and was built from this preset's recipe, else None. Reads, never writes.

    It does not recount the images: other commands add folders of their own beside them (corrupted copies), and the
    world was complete when its manifest was written; `force=True` rebuilds whatever was deleted since."""
    root = Path(root).expanduser().absolute()
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    fingerprint = preset_fingerprint(_preset(preset))
    if manifest.get("fingerprint") != fingerprint:
        return None
    if not all((root / "model" / name).is_file() for name in CHECKPOINT_FILES):
        return None
    world = _world_at(root, manifest.get("sft_report", {}), fingerprint)
    if not (world.train_json.is_file() and world.val_json.is_file() and world.test_json.is_file()):
        return None
    return world


def _preset(name: str) -> DemoPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown demo preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


_OWN_NAMES = {".lock", "data", "model", MANIFEST_NAME}
_OWN_TEMPORARY_PREFIXES = (".data.", ".model.", f".{MANIFEST_NAME}.")  # staging and retired copies, temp files


def _refuse_foreign_root(root: Path) -> None:
    """A build replaces ROOT/data and ROOT/model wholesale, so it must never run in a folder holding anything else."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"demo world root {root} is a file; choose a directory (--root or ${ENV_ROOT})")
    foreign = sorted(entry.name for entry in root.iterdir() if entry.name not in _OWN_NAMES
                     and not entry.name.startswith(_OWN_TEMPORARY_PREFIXES)) if root.is_dir() else []
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FileExistsError(f"demo world root {root} holds files that are not a demo world's ({listed}); choose an "
                              f"empty or new directory (--root or ${ENV_ROOT})")


@contextlib.contextmanager
def _exclusive(root: Path):
    """An advisory lock on ROOT/.lock for the duration of a build (POSIX; elsewhere builders are not serialised)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo_world(root: str | os.PathLike | None = None, *, preset: str = "full", progress: bool = True,
                      force: bool = False) -> DemoWorld:
    """The demo world at `root` (default: `default_root(preset)`), built first if it is missing, incomplete, or from
    another recipe (or when `force`). A complete world with the same fingerprint is returned without any work.

    `num_threads`: torch threads for the build (default: the preset's, at most the machine's cores); it changes the
    speed, not the recipe, so it is not part of the fingerprint."""
    spec = _preset(preset)
    root = Path(root if root is not None else default_root(preset)).expanduser().absolute()
    if not force and (world := load_complete_world(root, preset)) is not None:
        return world
    _refuse_foreign_root(root)
    with _exclusive(root):
        # Another process may have finished the world while this one waited for the lock.
        if not force and (world := load_complete_world(root, preset)) is not None:
            return world
        threads = spec.num_threads
        spec = dataclasses.replace(spec, vision_warmup=dataclasses.replace(spec.vision_warmup, num_threads=threads),
                                   sft=dataclasses.replace(spec.sft, num_threads=threads))
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)  # also for the data preparation and the evaluation around the training
        try:
            return _build(root, spec, progress)
        finally:
            torch.set_num_threads(previous_threads)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[demo] {message}", file=sys.stderr, flush=True)


def build_demo_model(spec: DemoPreset):
    """The untrained demo VLM (`VisionLanguageModel`, float32, CPU) for a preset."""
    from hscr_fast.demo.phantom import phantom_corpus
    from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava
    from hscr_fast.models.vlm import ModelOptions, VisionLanguageModel

    model, processor = build_tiny_llava(TinyLlavaSpec(**spec.model, corpus=phantom_corpus()))
    # LLaVA reads the second-to-last CLIP layer because CLIP's last one is specialised to its contrastive objective; a
    # tower trained from scratch here has no such layer, and skipping it would leave it untrained.
    model.config.vision_feature_layer = -1
    return VisionLanguageModel(model, processor, ModelOptions(prompt_format="llava-med", image_aspect_ratio="pad"))


def _build(root: Path, spec: DemoPreset, progress: bool) -> DemoWorld:
    from hscr_fast.data.records import load_llava_med_json
    from hscr_fast.demo.phantom import build_phantom_dataset
    from hscr_fast.demo.sft import prepare_patch_targets, prepare_sft_data, sft_train, vision_warmup

    timings: dict[str, float] = {}
    started = time.perf_counter()
    # Invalidate first: from here until the new manifest is written, the world is incomplete.
    (root / MANIFEST_NAME).unlink(missing_ok=True)

    _say(progress, f"building the {spec.name} demo world in {root}")
    paths = build_phantom_dataset(root / "data", **spec.dataset)
    train, _ = load_llava_med_json(paths.train_json, paths.image_folder)
    test, _ = load_llava_med_json(paths.test_json, paths.image_folder)
    timings["data"] = time.perf_counter() - started
    _say(progress, f"phantom data: {len(train)} training and {len(test)} test questions, the test set asked under an "
                   f"agreeing and a conflicting history ({timings['data']:.1f} s)")

    mark = time.perf_counter()
    vlm = build_demo_model(spec)
    sft_data = prepare_sft_data(vlm, train, paths.image_folder)
    timings["model"] = time.perf_counter() - mark
    num_parameters = sum(p.numel() for p in vlm.model.parameters())
    _say(progress, f"demo VLM: {num_parameters / 1e6:.2f} M parameters, vocabulary {len(vlm.tokenizer)}, "
                   f"{spec.sft.num_threads} CPU threads")

    mark = time.perf_counter()
    warmup_losses = vision_warmup(vlm, sft_data.pixel_values,
                                  prepare_patch_targets(vlm, train, paths.mask_folder), spec.vision_warmup,
                                  progress=progress)
    timings["vision_warmup"] = time.perf_counter() - mark
    _say(progress, f"vision warm-up done: patch loss {warmup_losses[0]:.3f} → {warmup_losses[-1]:.3f}")

    result = sft_train(vlm, sft_data, spec.sft, progress=progress)
    timings["sft"] = result.seconds
    _say(progress, f"SFT done: loss {result.losses[0]:.3f} → {result.losses[-1]:.3f} (final), "
                   f"{result.steps_per_second:.1f} steps/s")

    mark = time.perf_counter()
    accuracy = {}
    for split, evaluated in split_records(test, spec.eval_questions).items():
        accuracy[split] = demo_accuracy(vlm, evaluated, paths.image_folder)
        accuracy[split]["question_only_baseline"] = question_only_baseline(train, evaluated)
    timings["evaluate"] = time.perf_counter() - mark

    mark = time.perf_counter()
    model_dir = root / "model"
    _save_checkpoint(vlm, model_dir, progress)
    timings["save"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started

    report = {
        "splits": accuracy,
        "eval_questions": spec.eval_questions,
        "vision_warmup": {"steps": len(warmup_losses), "first_loss": warmup_losses[0],
                          "final_loss": warmup_losses[-1]},
        "sft": {"steps": len(result.losses), "batch_size": spec.sft.batch_size, "first_loss": result.losses[0],
                "final_loss": result.losses[-1], "loss_by_window": result.loss_by_window(),
                "steps_per_second": result.steps_per_second, "num_threads": result.num_threads},
        "num_parameters": num_parameters,
        "seconds": timings,
    }
    fingerprint = preset_fingerprint(spec)
    report["weights_sha256"] = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    atomic_write_json(root / MANIFEST_NAME, {"fingerprint": fingerprint, "preset": spec.name,
                                             "world_version": WORLD_VERSION, "sft_report": report})
    _say(progress, f"demo world ready in {timings['total']:.0f} s: {model_dir}")
    return _world_at(root, report, fingerprint)


def _save_checkpoint(vlm, model_dir: Path, progress: bool) -> None:
    """save_pretrained model + processor + sidecar into a temporary sibling, then swap it in (io.atomic_directory)."""
    from transformers.utils import logging as transformers_logging

    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    try:
        if not progress:  # save_pretrained draws a one-shard "Writing model shards" bar
            transformers_logging.disable_progress_bar()
        with atomic_directory(model_dir) as staging:
            vlm.model.save_pretrained(staging)
            vlm.processor.save_pretrained(staging)
            vlm.options.write(staging)
    finally:
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()


# -- accuracy ------------------------------------------------------------------------------------------------------

HEADLINE_METRICS = ("closed_accuracy", "open_recall", "closed_exact", "open_exact", "num_closed", "num_open",
                    "report_hallucination_rate", "hallucinated_finding_share", "finding_coverage", "num_reports")


def split_records(records, limit: int | None = None) -> dict[str, list]:
    """The test records of each split (`SPLITS`), the first `limit` of each. Both halves ask the same questions about
    the same images, in the same order, so the first N of each are the same N questions under the two histories."""
    by_split = {split: [r for r in records if r.metadata.get("prior") == relation]
                for split, relation in SPLITS.items()}
    return {split: chosen[:limit] for split, chosen in by_split.items()}


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics.get(key) for key in HEADLINE_METRICS}


@torch.no_grad()
def demo_accuracy(vlm, records, image_folder: str | os.PathLike, *, batch_size: int = 64,
                  max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, dict[str, Any]]:
    """Greedy answers scored as Med-VQA (`hscr_fast.evaluation.metrics`): with all visual tokens, and with none (the
    prompt
    without its image, the model's question-only behaviour)."""
    from hscr_fast.data.images import load_image
    from hscr_fast.evaluation.generation import GenerationPrompt, decode, greedy_generate
    from hscr_fast.evaluation.metrics import compute_metrics

    no_image = torch.empty(0, vlm.hidden_size, dtype=vlm.dtype, device=vlm.device)
    report = {}
    for condition in ("with_visual_tokens", "without_visual_tokens"):
        scored = []
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            if condition == "with_visual_tokens":
                images = [load_image(Path(image_folder) / record.image) for record in batch]
                visual = list(vlm.encode_images(vlm.preprocess_images(images)))
            else:
                visual = [no_image] * len(batch)
            items = [GenerationPrompt(vlm.prompt_tokens(record.question), tokens)
                     for record, tokens in zip(batch, visual)]
            for record, tokens in zip(batch, greedy_generate(vlm, items, max_new_tokens=max_new_tokens)):
                scored.append({"prediction": decode(vlm, tokens), "answer": record.answer,
                               "answer_type": record.answer_type, **_findings_field(record)})
        report[condition] = _headline(compute_metrics(scored))
    return report


def question_only_baseline(train_records, test_records) -> dict[str, Any]:
    """What the question text alone can score: each test question answered with the answer most often given to the
    same question text in training (else the most common answer of its answer type). The bar the demo model's
    with-image accuracy must clear for it to be using the image."""
    from hscr_fast.evaluation.metrics import compute_metrics

    by_question: dict[str, Counter] = defaultdict(Counter)
    by_type: dict[str, Counter] = defaultdict(Counter)
    for record in train_records:
        by_question[record.question][record.answer] += 1
        by_type[record.answer_type][record.answer] += 1
    scored = []
    for record in test_records:
        counts = by_question.get(record.question) or by_type.get(record.answer_type) or Counter({"": 1})
        scored.append({"prediction": counts.most_common(1)[0][0], "answer": record.answer,
                       "answer_type": record.answer_type, **_findings_field(record)})
    return _headline(compute_metrics(scored))


def _findings_field(record) -> dict[str, Any]:
    return {"findings": record.metadata["findings"]} if "findings" in record.metadata else {}
