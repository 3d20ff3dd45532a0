"""The demo world: the smoke preset built from nothing into a temporary directory, reloaded, reused, and its training
pieces (schedule, patch targets, determinism) checked on their own."""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import pytest
import torch

from hscr_fast.data.records import load_llava_med_json
from hscr_fast.demo import ensure_demo_world
from hscr_fast.demo.sft import (
    PATCH_CLASSES,
    SFTConfig,
    learning_rate_at,
    patch_lesion_classes,
    prepare_sft_data,
    sft_train,
)
from hscr_fast.demo.world import (
    CHECKPOINT_FILES,
    MANIFEST_NAME,
    PRESETS,
    build_demo_model,
    demo_accuracy,
    load_complete_world,
    preset_fingerprint,
    split_records,
)

SMOKE_BUILD_BUDGET_S = 40


@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "world"
    started = time.perf_counter()
    world = ensure_demo_world(root, preset="smoke", progress=False)
    return world, time.perf_counter() - started


def test_smoke_world_is_built_from_nothing_within_budget(smoke_world):
    world, seconds = smoke_world
    assert seconds < SMOKE_BUILD_BUDGET_S
    for path in (world.train_json, world.val_json, world.test_json):
        assert path.is_file()
    assert len(os.listdir(world.image_folder)) == len(os.listdir(world.mask_folder)) > 0
    for name in CHECKPOINT_FILES:
        assert (world.model_dir / name).is_file(), name
    manifest = json.loads((world.root / MANIFEST_NAME).read_text())
    assert manifest["fingerprint"] == world.fingerprint == preset_fingerprint(PRESETS["smoke"])
    # The weights' digest is recorded, and the build ran with the preset's thread count whatever the machine has.
    weights = (world.model_dir / "model.safetensors").read_bytes()
    assert manifest["sft_report"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert manifest["sft_report"]["sft"]["num_threads"] == PRESETS["smoke"].num_threads
    # No temporary directories are left behind by the atomic writes.
    assert not [p for p in world.root.iterdir() if p.name.startswith(".") and p.name != ".lock"]

    report = world.sft_report
    assert report["eval_questions"] == PRESETS["smoke"].eval_questions
    assert list(report["splits"]) == ["prior-agreeing", "prior-conflicting"]
    for _split, conditions in report["splits"].items():
        for condition in ("with_visual_tokens", "without_visual_tokens", "question_only_baseline"):
            scores = conditions[condition]
            assert scores["num_closed"] + scores["num_open"] == report["eval_questions"]
            assert 0 <= scores["closed_accuracy"] <= 100 and 0 <= scores["open_recall"] <= 100
            # Reports are among the evaluated questions and scored for hallucinated findings.
            assert scores["num_reports"] > 0 and 0 <= scores["report_hallucination_rate"] <= 100


def test_sft_loss_decreases(smoke_world):
    report = smoke_world[0].sft_report
    sft = report["sft"]
    assert sft["steps"] == PRESETS["smoke"].sft.steps
    windows = sft["loss_by_window"]
    assert all(math.isfinite(loss) for loss in windows)
    # From ~log(vocabulary) at random init to well below: the model learned at least the answer format.
    assert sft["first_loss"] > math.log(100)
    assert windows[-1] < 0.6 * windows[0]
    assert sft["final_loss"] < sft["first_loss"]
    assert report["vision_warmup"]["final_loss"] < report["vision_warmup"]["first_loss"]


def test_checkpoint_is_a_standard_transformers_directory_holding_the_trained_model(smoke_world):
    from hscr_fast.models.vlm import load_vlm

    world, _ = smoke_world
    config = json.loads((world.model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["image_size"] == PRESETS["smoke"].model["image_size"]
    vlm = load_vlm(world.model_dir)
    assert vlm.options.prompt_format == "llava-med"
    assert vlm.num_visual_tokens == (84 // 14) ** 2
    # Scoring the reloaded model gives exactly the numbers recorded at build time: the saved weights, tokenizer and
    # processor are the ones that were trained and evaluated. Same thread count as the build, so the same arithmetic.
    test, _ = load_llava_med_json(world.test_json, world.image_folder)
    conflicting = split_records(test, world.sft_report["eval_questions"])["prior-conflicting"]
    assert {record.metadata["prior"] for record in conflicting} == {"conflicts"}
    threads = torch.get_num_threads()
    torch.set_num_threads(PRESETS["smoke"].num_threads)
    try:
        scores = demo_accuracy(vlm, conflicting, world.image_folder)
    finally:
        torch.set_num_threads(threads)
    for condition in ("with_visual_tokens", "without_visual_tokens"):
        assert scores[condition] == world.sft_report["splits"]["prior-conflicting"][condition]


def test_second_call_is_a_fast_no_op(smoke_world):
    world, _ = smoke_world
    watched = [world.root / MANIFEST_NAME, world.model_dir / "model.safetensors", world.train_json]
    before = [path.stat().st_mtime_ns for path in watched]
    started = time.perf_counter()
    again = ensure_demo_world(world.root, preset="smoke", progress=False)
    assert time.perf_counter() - started < 3.0
    assert again == world and again.fingerprint == world.fingerprint and again.sft_report == world.sft_report
    assert [path.stat().st_mtime_ns for path in watched] == before


def test_only_a_complete_world_of_the_same_recipe_is_reused(smoke_world, tmp_path):
    world, _ = smoke_world
    assert load_complete_world(world.root, "smoke") == world
    assert load_complete_world(world.root, "full") is None  # another preset's fingerprint
    assert preset_fingerprint(PRESETS["smoke"]) != preset_fingerprint(PRESETS["full"])
    # The thread count changes the order of floating-point sums, hence the weights: it is part of the recipe.
    assert preset_fingerprint(PRESETS["smoke"]) != preset_fingerprint(
        dataclasses.replace(PRESETS["smoke"], num_threads=PRESETS["smoke"].num_threads + 1))

    copy = tmp_path / "copy"
    shutil.copytree(world.root, copy)
    assert load_complete_world(copy, "smoke") is not None
    (copy / "model" / "model.safetensors").unlink()
    assert load_complete_world(copy, "smoke") is None

    shutil.copytree(world.root, copy, dirs_exist_ok=True)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["fingerprint"] = "0" * 16
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert load_complete_world(copy, "smoke") is None

    with pytest.raises(ValueError, match="unknown demo preset 'tiny'.*full"):
        ensure_demo_world(tmp_path / "other", preset="tiny")


def test_a_folder_that_is_not_a_demo_world_is_never_built_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model").mkdir()
    with pytest.raises(FileExistsError, match="notes.txt"):
        ensure_demo_world(tmp_path, preset="smoke", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "model").is_dir()


def test_command_prints_accuracy_with_and_without_visual_tokens(smoke_world, capsys):
    from hscr_fast.demo.__main__ import main

    world, _ = smoke_world
    assert main(["--root", str(world.root), "--preset", "smoke", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert str(world.model_dir) in out
    for split in ("prior-agreeing", "prior-conflicting"):
        for label in ("with visual tokens", "without visual tokens", "question-only baseline"):
            line = next(line for line in out.splitlines() if line.strip().startswith(f"{split} ")
                        and label in line)
            assert line.count("%") == 3


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    config = SFTConfig(steps=50, warmup_steps=5, learning_rate=1e-3, min_learning_rate=1e-4)
    rates = [learning_rate_at(step, config) for step in range(config.steps)]
    assert rates[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert rates[5] == pytest.approx(1e-3)
    assert all(later <= earlier for earlier, later in zip(rates[5:], rates[6:]))
    assert rates[-1] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="min_learning_rate"):
        SFTConfig(learning_rate=1e-4, min_learning_rate=1e-3)


def test_patch_lesion_classes_follow_the_dominant_lesion():
    mask = np.zeros((28, 42), dtype=np.uint8)
    mask[0:3, 0:3] = 1  # small lesion, top-left patch only
    mask[15:28, 13:20] = 2  # large lesion: 1 column in patch (1, 0), 6 columns in patch (1, 1)
    mask[14, 28] = 2
    lesions = [{"index": 1, "size": "small"}, {"index": 2, "size": "large"}]
    classes = patch_lesion_classes(mask, lesions, 14)
    small, large = PATCH_CLASSES.index("small"), PATCH_CLASSES.index("large")
    assert classes.tolist() == [small, 0, 0, large, large, large]
    with pytest.raises(ValueError, match="does not tile"):
        patch_lesion_classes(np.zeros((30, 28), dtype=np.uint8), [], 14)


@pytest.mark.parametrize("threads", [1, 2])
def test_sft_is_deterministic_and_trains_every_used_parameter(smoke_world, threads):
    world, _ = smoke_world
    records, _ = load_llava_med_json(world.train_json, world.image_folder)
    config = SFTConfig(steps=3, batch_size=4, warmup_steps=1, num_threads=threads, seed=3)
    runs = []
    for _ in range(2):
        vlm = build_demo_model(PRESETS["smoke"])
        initial = {name: p.detach().clone() for name, p in vlm.model.named_parameters()}
        result = sft_train(vlm, prepare_sft_data(vlm, records[:12], world.image_folder), config, progress=False)
        runs.append((result.losses, {name: p.detach().clone() for name, p in vlm.model.named_parameters()}))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert losses_a == losses_b
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    changed = {name for name in weights_a if not torch.equal(weights_a[name], initial[name])}
    # CLIP's post_layernorm feeds only its pooled output, which LLaVA never reads: the only parameters left alone.
    assert {name for name in weights_a if name not in changed} <= {
        "model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"}
    assert any("vision_tower.embeddings" in name for name in changed)
    assert any("multi_modal_projector" in name for name in changed)
    assert any("language_model.layers" in name for name in changed)


def test_quick_ablations_run_every_selected_row_and_record_the_rest(smoke_world, tmp_path):
    from hscr_fast.demo.ablations import ROWS, main

    world, _ = smoke_world
    # the token-level row trains on images outside the world's image folder (its grounding pairs' corrupted copies)
    chosen = ["SFT", "HSCR: MLPO explicit + implicit", "pixel-level mask", "token-level KL + grounding"]
    assert main(["--quick", "--rows", *chosen, "--world", str(world.root), "--work", str(tmp_path / "work"),
                 "--out", str(tmp_path / "results")]) == 0
    (json_path,) = (tmp_path / "results").glob("ablations-quick-*.json")
    assert json_path.with_suffix(".md").is_file() and json_path.with_suffix(".png").is_file()
    result = json.loads(json_path.read_text())
    assert result["mode"] == "quick" and result["settings"]["seeds"] == [0] and result["commit"]
    assert [row["name"] for row in result["rows"]] == [row.name for row in ROWS]
    by_name = {row["name"]: row for row in result["rows"]}
    for name, row in by_name.items():
        if name not in chosen:
            assert row["status"] == "not run" and "--rows" in row["reason"]
    assert by_name["SFT"]["status"] == by_name["HSCR: MLPO explicit + implicit"]["status"] == "run"
    hscr = by_name["HSCR: MLPO explicit + implicit"]
    assert hscr["learning_rate"] == 5e-5 and set(hscr["validation"]) == {"5e-05"}
    for split in ("prior-agreeing", "prior-conflicting"):
        primary = hscr["test"][split]["primary"]
        assert primary["n"] == 1 and primary["std"] is None and 0 <= primary["mean"] <= 100
        seed = hscr["seeds"]["0"][split]
        assert primary["mean"] == pytest.approx((seed["closed_accuracy"] + seed["open_recall"]) / 2)
    pixel = by_name["pixel-level mask"]
    assert pixel["status"] in ("run", "not available")
    if pixel["status"] == "not available":
        assert "perturbation" in pixel["reason"]
    # A finished result is never overwritten silently.
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--quick", "--rows", "SFT", "--world", str(world.root), "--work", str(tmp_path / "work"),
              "--out", str(tmp_path / "results")])


def test_demo_report_json_has_exactly_the_documented_keys(tmp_path):
    from hscr_fast.demo.pipeline import demo_report_json
    from hscr_fast.evaluation.report import WITH_VISUAL, WITHOUT_VISUAL

    train = [{"id": "a", "lesions": []}, {"id": "b", "lesions": [{"side": "left"}]}, {"id": "c", "lesions": []}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    lists = [{"id": "a", "responses": ["x", "y"]}, {"id": "b", "responses": ["x", "y", "z"]},
             {"id": "c", "responses": ["x", "y", "z"]}]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lists))

    def metrics(closed, recall, hallucination=None):
        out = {"closed_accuracy": closed, "open_recall": recall}
        return out if hallucination is None else {**out, "report_hallucination_rate": hallucination}

    measured = {model: {split: {WITH_VISUAL: metrics(80.0 + offset, 90.0, 5.0), WITHOUT_VISUAL: metrics(60.0, None)}
                        for offset, split in enumerate(("prior-agreeing", "prior-conflicting"))}
                for model in ("before", "after")}
    report = demo_report_json(measured, preferences=tmp_path / "prefs.jsonl", train_json=tmp_path / "train.json")
    assert set(report) == {"preference_lists", "prior_conflicting_split", "results"}
    assert report["preference_lists"] == {"count": 3, "k_counts": {"1": 1, "2": 2}, "normal_scan_lists": 2}
    assert report["prior_conflicting_split"] == "prior-conflicting"
    assert len(report["results"]) == 8
    for row in report["results"]:
        assert set(row) == {"model", "split", "visual_tokens", "closed_accuracy", "open_recall", "hallucination_rate"}
    first = report["results"][:4]
    assert [(r["model"], r["split"], r["visual_tokens"]) for r in first] == [
        ("before", "prior-agreeing", True), ("before", "prior-agreeing", False),
        ("before", "prior-conflicting", True), ("before", "prior-conflicting", False)]
    assert first[2]["closed_accuracy"] == 81.0 and first[0]["hallucination_rate"] == 5.0
    assert first[1]["open_recall"] is None and first[1]["hallucination_rate"] is None  # null where not applicable
