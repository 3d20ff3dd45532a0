"""The embedded default: `torchrun -m hscr_fast.train` with no arguments runs HSCR end to end on the demo world.

1. prepare the demo world if absent (phantom Med-VQA data + a tiny SFT-trained LLaVA; cached);
2. stage 1-2: build preference lists from the demo model (`hscr_fast.generate`);
3. stage 3: MLPO training (`hscr_fast.training.loop.train`);
4. score both halves of the phantom test set (clinical history agreeing with the image, and conflicting with it)
   before (adapter disabled) and after HSCR, with and without visual tokens, and write the report: Markdown, PNG and
   `demo_report.json` (`demo_report_json`).

The tiny demo model is not a 7B model: the paper's learning rate (5e-7 for LoRA on Mistral-7B) would not move it
in a few hundred steps, so the demo trains with `DEMO_TRAINING` below; every other setting is the paper's. Any flag
given on the command line (e.g. `--learning-rate`) overrides the demo's value.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from hscr_fast.demo.world import MAX_NEW_TOKENS, PRIOR_CONFLICTING_SPLIT
from hscr_fast.runtime.io import atomic_write_json

DEMO_OUT = "runs/hscr-demo"
DEMO_GENERATION = {"num_samples": 800, "batch_size": 16}
# Chosen on the first demo world, which had no clinical-history prior (before: 80.9% closed / 87.3% open; after HSCR at
# 5e-5 80.0 / 87.3, at 2e-4 80.0 / 84.2, at 1e-3 74.7 / 77.8), and kept for the current world so that the demo's
# setting was not tuned on the world it demonstrates. `python -m hscr_fast.demo.ablations` gives every method its
# learning rate from the validation split instead.
DEMO_TRAINING = {"learning_rate": 5e-5, "per_device_batch_size": 8, "epochs": 2, "save_steps": 25,
                 "warmup_ratio": 0.05, "eval_fraction": 0.05, "eval_steps": 25}
DEMO_EVAL_QUESTIONS = 200  # per test split


def run_demo(config) -> int:
    from hscr_fast import generate
    from hscr_fast.demo import ensure_demo_world
    from hscr_fast.training.config import TrainConfig
    from hscr_fast.training.loop import train

    rank = int(os.environ.get("RANK", "0"))
    defaults = TrainConfig()
    for key, value in DEMO_TRAINING.items():  # demo values unless the user set the flag
        if getattr(config, key) == getattr(defaults, key):
            setattr(config, key, value)
    if config.out == defaults.out:
        config.out = DEMO_OUT
    out = Path(config.out)

    say = print if rank == 0 else (lambda *a, **k: None)
    say("[hscr demo] 1/4 demo world (phantom chest scans + tiny SFT LLaVA)")
    world = ensure_demo_world()
    say(f"[hscr demo] 2/4 stage 1-2: preference lists from {world.model_dir}")
    preferences = out / "preferences.jsonl"
    generate.main(["--model", str(world.model_dir), "--data", str(world.train_json),
                   "--image-folder", str(world.image_folder), "--out", str(preferences),
                   "--num-samples", str(DEMO_GENERATION["num_samples"]),
                   "--batch-size", str(DEMO_GENERATION["batch_size"])])
    say("[hscr demo] 3/4 stage 3: MLPO training")
    config.model, config.preferences, config.image_folder = str(world.model_dir), str(preferences), \
        str(world.image_folder)
    result = train(config)
    if rank == 0:
        say("[hscr demo] 4/4 before/after on the phantom test set, history agreeing / conflicting with the image")
        report_md, report_png = evaluate_before_after(world, result.adapter_dir, out, preferences=preferences)
        say(f"\n{report_md.read_text()}\n[hscr demo] report: {report_md}\n[hscr demo] chart:  {report_png}\n"
            f"[hscr demo] adapter: {result.adapter_dir}\n[hscr demo] metrics: {result.metrics_path}\n"
            f"[hscr demo] curves: {result.plot_path}")
    return 0


def evaluate_before_after(world, adapter_dir: Path, out: Path, method: str = "HSCR",
                          preferences: Path | None = None) -> tuple[Path, Path]:
    """Closed accuracy, open recall and report hallucination of the SFT model (adapter disabled) and the aligned model,
    each with and without visual tokens, on the first DEMO_EVAL_QUESTIONS questions of each test split (history
    agreeing with the image / conflicting with it). Writes OUT/demo_report.md, .png and .json (`demo_report_json`)."""
    from hscr_fast.demo.world import split_records
    from hscr_fast.evaluation.report import write_demo_report
    from hscr_fast.evaluation.run import (
        evaluate_with_and_without_visual,
        load_eval_records,
        load_model,
    )

    splits = split_records(load_eval_records(world.test_json, world.image_folder), DEMO_EVAL_QUESTIONS)
    for stale in ("eval-before", "eval-after"):  # a rerun's adapter has the same path: never resume its answers
        shutil.rmtree(out / stale, ignore_errors=True)
    vlm = load_model(world.model_dir, adapter_dir)
    run = {"model": str(world.model_dir), "adapter": str(adapter_dir), "data": str(world.test_json),
           "limit": DEMO_EVAL_QUESTIONS}
    options = dict(image_folder=world.image_folder, batch_size=32, max_new_tokens=MAX_NEW_TOKENS,
                   data_path=world.test_json)
    measured: dict[str, dict[str, dict]] = {"before": {}, "after": {}}
    for split, records in splits.items():
        with vlm.adapter_disabled():
            measured["before"][split] = evaluate_with_and_without_visual(
                vlm, records, out / "eval-before" / split, run={**run, "adapter": None, "split": split}, **options)
        measured["after"][split] = evaluate_with_and_without_visual(
            vlm, records, out / "eval-after" / split, run={**run, "split": split}, **options)
    results = {f"{model} {method}, {split}": measured[model][split] for split in splits for model in measured}
    md_path, png_path = write_demo_report(out, results)
    atomic_write_json(out / "demo_report.json",
                      demo_report_json(measured, preferences=preferences, train_json=world.train_json))
    return md_path, png_path


def demo_report_json(measured: dict[str, dict[str, dict[str, dict]]], *, preferences: Path | None,
                     train_json: Path) -> dict:
    """The demo's results for scripts: exactly the keys `preference_lists`, `prior_conflicting_split`, `results`.

    `measured[model][split][condition]` holds metrics dicts (model "before"/"after", condition `WITH_VISUAL` /
    `WITHOUT_VISUAL`). `preference_lists` counts the lists of `preferences` (None without one): how many, how many
    have k dispreferred responses, and how many ask about a normal scan (no lesion in the training record)."""
    from hscr_fast.evaluation.report import WITH_VISUAL, WITHOUT_VISUAL

    results = []
    for model, splits in measured.items():
        for split, conditions in splits.items():
            for condition, visual_tokens in ((WITH_VISUAL, True), (WITHOUT_VISUAL, False)):
                metrics = conditions[condition]
                results.append({"model": model, "split": split, "visual_tokens": visual_tokens,
                                "closed_accuracy": metrics.get("closed_accuracy"),
                                "open_recall": metrics.get("open_recall"),
                                "hallucination_rate": metrics.get("report_hallucination_rate")})
    return {"preference_lists": None if preferences is None else preference_list_counts(preferences, train_json),
            "prior_conflicting_split": PRIOR_CONFLICTING_SPLIT, "results": results}


def preference_list_counts(preferences: Path, train_json: Path) -> dict:
    """{count, k_counts: {k: lists}, normal_scan_lists} of a preference JSONL built from the phantom training set."""
    import json
    from collections import Counter

    from hscr_fast.runtime.io import read_jsonl

    lesions_of = {record["id"]: record.get("lesions", []) for record in json.loads(Path(train_json).read_text())}
    lists = read_jsonl(preferences)
    k_counts = Counter(len(entry["responses"]) - 1 for entry in lists)
    return {"count": len(lists), "k_counts": {str(k): k_counts[k] for k in sorted(k_counts)},
            "normal_scan_lists": sum(not lesions_of.get(entry["id"], [None]) for entry in lists)}


if __name__ == "__main__":
    from hscr_fast.training.config import TrainConfig

    sys.exit(run_demo(TrainConfig.from_args(sys.argv[1:])))
