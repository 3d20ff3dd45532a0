"""The MLPO trainer end to end on the tiny model: loss at initialisation, a loadable PEFT adapter, exact resume,
NaN handling, validation before the model loads, and DeepSpeed ZeRO-2 across 2 CPU processes."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import PREFERENCE_ANSWERS, make_images, write_preference_lists

from hscr_fast import HscrError
from hscr_fast.training.config import TrainConfig
from hscr_fast.training.loop import TrainingDiverged, train


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory):
    return write_preference_lists(tmp_path_factory.mktemp("prefs"), {"prefs.jsonl": 10}, seed=11)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_runs_and_writes_a_loadable_adapter(tiny_model_dir, preference_data, tmp_path, train_config):
    from peft import PeftModel

    from hscr_fast.listwise import listwise_logprobs, pack_examples
    from hscr_fast.models.vlm import load_vlm
    from hscr_fast.training.data import to_examples, tokenize_preferences, validate_preferences

    result = train(train_config(preference_data, tmp_path / "run"))
    rows = read_metrics(tmp_path / "run")
    assert result.steps == len(rows) == 2 * (10 // 2)
    # At step 1 the policy equals the reference (LoRA B = 0, no dropout): every pair contributes log 2.
    first = rows[0]
    assert first["margin_explicit"] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(row["loss"]) and row["tokens_per_second"] > 0 for row in rows)
    assert rows[-1]["margin_explicit"] > 0  # lr 2e-3 on this tiny data: the policy learns the preference
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The adapter is standard PEFT: loading it on the base model reproduces the trained policy's log-probs.
    records = validate_preferences(preference_data / "prefs.jsonl", preference_data / "images")
    base = load_vlm(tiny_model_dir)
    items = tokenize_preferences(base, records, preference_data / "images")[:4]
    with torch.no_grad():
        before = listwise_logprobs(base, pack_examples(base.embed_tokens, to_examples(base, items)))
        base.model = PeftModel.from_pretrained(base.model, str(result.adapter_dir))
        after = listwise_logprobs(base, pack_examples(base.embed_tokens, to_examples(base, items)))
    assert not torch.allclose(before, after)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 16 and "vision_tower" not in json.dumps(config["target_modules"])


def test_resume_reproduces_the_uninterrupted_run(preference_data, tmp_path, train_config):
    full = train_config(preference_data, tmp_path / "full")
    train(full)
    interrupted = train_config(preference_data, tmp_path / "parts", stop_after_steps=3, save_steps=1)
    assert train(interrupted).steps == 3
    resumed = train_config(preference_data, tmp_path / "parts", resume=True, save_steps=1)
    assert train(resumed).steps == 10
    expected, got = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "parts")
    assert [r["step"] for r in got] == list(range(1, 11))
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(preference_data, tmp_path, monkeypatch, train_config):
    import hscr_fast.losses as losses

    real = losses.mlpo_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    monkeypatch.setattr(losses, "mlpo_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 3 .*Last good checkpoint: .*step-2"):
        train(train_config(preference_data, tmp_path / "nan", save_steps=1))
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text() == "step-2"


def test_bad_preference_file_is_reported_before_the_model_loads(tmp_path, preference_data):
    bad = tmp_path / "bad.jsonl"
    lines = (preference_data / "prefs.jsonl").read_text().splitlines()
    lines[3] = json.dumps({"id": "x", "image": "img0.png", "prompt": "q", "responses": []})
    bad.write_text("\n".join(lines) + "\n")
    config = TrainConfig(model=str(tmp_path / "no-such-model"), preferences=str(bad),
                         image_folder=str(preference_data / "images"), out=str(tmp_path / "o"), deepspeed="none")
    with pytest.raises(ValueError, match=r"bad.jsonl:4.*responses"):
        train(config)
    missing = tmp_path / "missing.jsonl"
    lines[3] = json.dumps({"id": "x", "image": "gone.png", "prompt": "q", "responses": ["a", "b"]})
    missing.write_text("\n".join(lines) + "\n")
    config.preferences = str(missing)
    with pytest.raises(ValueError, match=r"missing.jsonl:4.*gone.png"):
        train(config)


def _torchrun(nproc, args, env):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
               str(29500 + nproc + os.getpid() % 1000), "-m", "hscr_fast.train", *args]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]


def test_deepspeed_zero2_two_processes_match_one(tiny_model_dir, preference_data, tmp_path):
    """2 CPU processes (gloo) × batch 2 give the same losses as 1 process × batch 4: same global batch. The held-out
    metrics (2 of the 10 lists, one per rank) are gathered across ranks and match too."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["--model", str(tiny_model_dir), "--preferences", str(preference_data / "prefs.jsonl"),
              "--image-folder", str(preference_data / "images"), "--epochs", "1", "--learning-rate", "2e-3",
              "--deepspeed", "zero2", "--save-steps", "100", "--eval-fraction", "0.2", "--eval-steps", "1"]
    _torchrun(1, common + ["--out", str(tmp_path / "one"), "--per-device-batch-size", "4"], env)
    _torchrun(2, common + ["--out", str(tmp_path / "two"), "--per-device-batch-size", "2"], env)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 2 * (8 // 4)  # 8 lists train, 2 held out; a training and an eval row per step
    for a, b in zip(one, two):
        assert a["step"] == b["step"]
        # A row is a training row or a held-out row; each must carry its own metrics in both runs.
        held_out = "eval_loss" in a
        names = (("eval_loss", 1e-4), ("eval_margin_explicit", 1e-3)) if held_out else \
            (("loss", 1e-4), ("margin_explicit", 1e-3))
        for name, rel in names:
            assert name in a and name in b, (name, a, b)
            assert b[name] == pytest.approx(a[name], rel=rel, abs=1e-6), name
    assert [row["eval_lists"] for row in two if "eval_lists" in row] == [2, 2]
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()


def test_gradient_checkpointing_matches_and_merged_model_equals_adapter(tiny_model_dir, preference_data, tmp_path,
                                                                       train_config):
    from hscr_fast.evaluation.run import load_model
    from hscr_fast.listwise import listwise_logprobs, pack_examples
    from hscr_fast.models.vlm import load_vlm
    from hscr_fast.training.data import to_examples, tokenize_preferences, validate_preferences

    short = dict(epochs=1, per_device_batch_size=4)
    plain = train(train_config(preference_data, tmp_path / "plain", **short))
    checkpointed = train(train_config(preference_data, tmp_path / "gc", gradient_checkpointing=True,
                                     merge=True, **short))
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "gc")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert plain.steps == checkpointed.steps == 2

    records = validate_preferences(preference_data / "prefs.jsonl", preference_data / "images")
    merged = load_vlm(checkpointed.merged_dir)
    adapted = load_model(tiny_model_dir, checkpointed.adapter_dir)
    items = tokenize_preferences(merged, records, preference_data / "images")[:3]
    with torch.no_grad():
        from_merged = listwise_logprobs(merged, pack_examples(merged.embed_tokens, to_examples(merged, items)))
        from_adapter = listwise_logprobs(adapted, pack_examples(adapted.embed_tokens, to_examples(adapted, items)))
    torch.testing.assert_close(from_merged, from_adapter, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def image_preference_data(tmp_path_factory):
    """Image-side dispreference lists: the same answer under the clean and a corrupted image, with MMedPO weights."""
    root = tmp_path_factory.mktemp("image_prefs")
    (root / "images").mkdir()
    lines = []
    for index, image in enumerate(make_images(8, seed=21)):
        image.save(root / "images" / f"clean{index}.png")
        image.rotate(90).save(root / "images" / f"noisy{index}.png")
        answer = PREFERENCE_ANSWERS[index % len(PREFERENCE_ANSWERS)]
        lines.append(json.dumps({"id": f"i{index}", "image": f"clean{index}.png", "prompt": "What is seen?",
                                 "responses": [answer, answer], "weight": 0.5 + index / 8,
                                 "response_images": [f"clean{index}.png", f"noisy{index}.png"],
                                 "kind": "image-dispreference"}))
    (root / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_weighted_dpo_on_image_dispreference_lists(image_preference_data, preference_data, tmp_path, train_config):
    weighted = train(train_config(image_preference_data, tmp_path / "w", loss="weighted-dpo",
                                 kind_weight=["image-dispreference=0.1"], epochs=1))
    rows = read_metrics(tmp_path / "w")
    assert weighted.steps == len(rows) == 4
    # Step 1: policy = reference, so each sample's loss is log 2 × its weight × 0.1.
    from hscr_fast.training.data import batch_indices
    first = batch_indices(8, epoch=0, step_in_epoch=0, per_device_batch=2, world_size=1, rank=0, seed=0)
    expected = sum(0.1 * (0.5 + i / 8) * math.log(2) for i in first) / 2
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(HscrError, match="needs a 'weight'"):
        train(train_config(preference_data, tmp_path / "x", loss="weighted-dpo"))


def test_command_reports_bad_input_in_one_line(tmp_path, capsys):
    from hscr_fast.train import main

    code = main(["--model", str(tmp_path / "nope"), "--preferences", str(tmp_path / "missing.jsonl"),
                 "--image-folder", str(tmp_path), "--deepspeed", "none"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.jsonl'}: file not found"


def test_deepspeed_without_torchrun(tiny_model_dir, preference_data, tmp_path):
    """`python -m hscr_fast.train` (no launcher) with the default DeepSpeed engine: a one-process group, not MPI."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "hscr_fast.train", "--model", str(tiny_model_dir), "--preferences",
         str(preference_data / "prefs.jsonl"), "--image-folder", str(preference_data / "images"), "--epochs", "1",
         "--per-device-batch-size", "4", "--out", str(tmp_path / "ds")],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert len(read_metrics(tmp_path / "ds")) == 2


def test_a_finished_run_is_refused_unless_resume_or_overwrite(preference_data, tmp_path, train_config):
    import hashlib

    from hscr_fast.training.loop import PreviousRunError

    def snapshot(folder):
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    out = tmp_path / "run"
    (tmp_path / "run").mkdir()
    (out / "notes.txt").write_text("the user's own file")
    train(train_config(preference_data, out, epochs=1, save_steps=1, save_total_limit=5))
    finished = snapshot(out)
    with pytest.raises(PreviousRunError, match=r"--out .*run already holds a run \(adapter, checkpoints, "
                                               r"metrics.jsonl, curves.png\); add --resume .* --overwrite"):
        train(train_config(preference_data, out, epochs=1, stop_after_steps=2))
    assert snapshot(out) == finished  # nothing touched

    train(train_config(preference_data, out, epochs=1, stop_after_steps=2, save_steps=1, overwrite=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-1", "step-2"]
    assert [row["step"] for row in read_metrics(out)] == [1, 2]
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_adapter_records_the_base_model_as_an_absolute_path(tiny_model_dir, monkeypatch):
    """A relative --model is resolved: the adapter's base check must not depend on the working directory."""
    from hscr_fast.models.vlm import load_vlm
    from hscr_fast.training.loop import attach_lora

    monkeypatch.chdir(tiny_model_dir.parent)
    vlm = load_vlm(tiny_model_dir.name)
    attach_lora(vlm, TrainConfig(), tiny_model_dir.name)
    assert vlm.model.peft_config["default"].base_model_name_or_path == str(tiny_model_dir.resolve())


@pytest.mark.slow  # 1-3 min: two torchrun launches of 2 CPU ranks each
def test_deepspeed_zero3_two_processes_match_zero2(tiny_model_dir, preference_data, tmp_path):
    """ZeRO-3 partitions every parameter, lm_head included, which the fused log-prob kernel reads directly: the
    trainer gathers it. 2 gloo ranks under ZeRO-3 give ZeRO-2's losses at every step and the same adapter (saved
    whole, not as each rank's empty placeholder)."""
    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["--model", str(tiny_model_dir), "--preferences", str(preference_data / "prefs.jsonl"),
              "--image-folder", str(preference_data / "images"), "--epochs", "2", "--learning-rate", "2e-3",
              "--per-device-batch-size", "2", "--save-steps", "100"]
    _torchrun(2, common + ["--deepspeed", "zero2", "--out", str(tmp_path / "zero2")], env)
    _torchrun(2, common + ["--deepspeed", "zero3", "--out", str(tmp_path / "zero3")], env)
    zero2, zero3 = read_metrics(tmp_path / "zero2"), read_metrics(tmp_path / "zero3")
    assert [row["step"] for row in zero3] == [1, 2, 3, 4]
    assert zero3[-1]["margin_explicit"] != zero3[0]["margin_explicit"]  # the policy moved: later steps compare
    for a, b in zip(zero2, zero3):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    adapter2 = load_file(tmp_path / "zero2" / "adapter" / "adapter_model.safetensors")
    adapter3 = load_file(tmp_path / "zero3" / "adapter" / "adapter_model.safetensors")
    assert adapter3.keys() == adapter2.keys()
    for name, tensor in adapter2.items():
        assert adapter3[name].shape == tensor.shape and adapter3[name].numel() > 0
        torch.testing.assert_close(adapter3[name], tensor, rtol=1e-4, atol=1e-6)
