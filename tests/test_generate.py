"""`python -m hscr_fast.generate` end to end on the tiny LLaVA: record format, the Stage 2 ladder, skips with reasons
and nothing lost, resume after a kill (byte-identical files), torchrun with 2 CPU processes (gloo) = 1 process."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hscr_fast import generate
from hscr_fast.preferences import pipeline
from hscr_fast.runtime.io import read_jsonl

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # see conftest

QA = [
    ("Is there a lesion in the left lung?", "yes", "CLOSED"),
    ("Where is the abnormality?", "The right upper lobe shows a small nodule.", "OPEN"),
    ("How many lesions are there?", "two lesions, left lung", "OPEN"),
    ("What organ is shown in this image?", "chest", "OPEN"),
    ("Describe the image.", "A large mass in the left lower lobe with effusion, no fracture seen.", "OPEN"),
    ("Is this a normal image?", "no", "CLOSED"),
]
NUM_GOOD = 48
LONG_ANSWER = " ".join(["the left lower lobe shows a small nodule"] * 8)
EXPECTED_SKIPS = {  # id -> (stage, reason)
    "empty": ("input", "empty_answer"),
    "nofile": ("generate", "missing_image"),
    "corrupt": ("generate", "unreadable_image"),
    "long": ("generate", "too_long"),
    "punct": ("generate", "no_sensitive_positions"),
    "g1": ("input", "duplicate_id"),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def entry(sample_id, image, question, answer, answer_type=None):
    item = {"id": sample_id, "image": image,
            "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}
    if answer_type:
        item["answer_type"] = answer_type
    return item


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_vlm):
    """Good samples with random images of odd sizes, plus one of each way a sample can be left out."""
    root = tmp_path_factory.mktemp("sft")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    entries = []
    for index in range(NUM_GOOD):
        question, answer, answer_type = QA[index % len(QA)]
        size = (30 + 7 * (index % 5), 41 + 3 * (index % 7))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"g{index}.png")
        entries.append(entry(f"g{index}", f"g{index}.png", question, answer, answer_type))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    entries[5:5] = [entry("empty", "g0.png", "What is shown?", "   ")]
    entries[9:9] = [entry("nofile", "missing.png", "What is shown?", "chest")]
    entries[14:14] = [entry("corrupt", "corrupt.png", "What is shown?", "chest")]
    entries[20:20] = [entry("long", "g2.png", "Describe the image.", LONG_ANSWER)]
    entries[26:26] = [entry("punct", "g3.png", "What is shown?", "?!")]
    entries[31:31] = [entry("g1", "g4.png", "What is shown?", "a duplicate id")]
    data = root / "sft.json"
    data.write_text(json.dumps(entries))

    # --max-length: every good sample fits, the long one does not.
    prompt = tiny_vlm.prompt_tokens(QA[4][0])
    good = max(len(tiny_vlm.prompt_tokens(q).before_image + tiny_vlm.prompt_tokens(q).after_image)
               + tiny_vlm.num_visual_tokens + len(tiny_vlm.answer_tokens(tiny_vlm.prompt_tokens(q), a))
               for q, a, _ in QA)
    long_length = prompt.num_text_tokens + tiny_vlm.num_visual_tokens + len(tiny_vlm.answer_tokens(prompt, LONG_ANSWER))
    assert long_length > good
    return {"data": data, "images": images, "entries": entries, "max_length": good}


@pytest.fixture(scope="module")
def cached_similarity():
    """One all-MiniLM-L6-v2 for every in-process run of this module (loading it costs seconds)."""
    from hscr_fast.preferences import rerank

    model = rerank.SentenceSimilarity()
    original = rerank.SentenceSimilarity
    rerank.SentenceSimilarity = lambda *args, **kwargs: model
    yield model
    rerank.SentenceSimilarity = original


def argv(tiny_model_dir, dataset, out, *extra):
    return ["--model", str(tiny_model_dir), "--data", str(dataset["data"]), "--image-folder", str(dataset["images"]),
            "--out", str(out), "--batch-size", "4", "--max-length", str(dataset["max_length"]), *extra]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir, dataset, cached_similarity):
    """One uninterrupted single-process run with the default (paper) settings."""
    out = tmp_path_factory.mktemp("reference") / "prefs.jsonl"
    assert generate.main(argv(tiny_model_dir, dataset, out)) == 0
    return out


def test_records_ladders_and_skips_lose_nothing(reference_run, dataset):
    paths = pipeline.OutputPaths(reference_run)
    written, skipped = read_jsonl(paths.out), read_jsonl(paths.skipped)
    summary = json.loads(paths.summary.read_text())
    entries = {e["id"]: e for e in reversed(dataset["entries"])}  # the first of a duplicated id wins

    # Nothing lost: every input entry is written once or skipped once, with the expected reason.
    # Good samples whose answer has no token the random tiny model's image supports (s_t > 0) are skipped too.
    assert len(written) + len(skipped) == len(dataset["entries"])
    reasons = {line["id"]: (line["stage"], line["reason"]) for line in skipped}
    unsupported = {sample_id for sample_id in reasons if sample_id not in EXPECTED_SKIPS}
    assert {sample_id: reasons[sample_id] for sample_id in EXPECTED_SKIPS} == EXPECTED_SKIPS
    assert all(reasons[sample_id] == ("generate", "no_sensitive_positions") for sample_id in unsupported)
    good_ids = [f"g{i}" for i in range(NUM_GOOD) if f"g{i}" not in unsupported]
    assert [line["id"] for line in written] == good_ids and len(good_ids) >= NUM_GOOD // 2  # input order
    assert summary["read"] == len(dataset["entries"]) and summary["written"] == len(good_ids)
    assert summary["skipped_total"] == len(EXPECTED_SKIPS) + len(unsupported) and summary["not_selected"] == 0
    expected_counts = {reason: 1 for _, reason in EXPECTED_SKIPS.values()}
    expected_counts["no_sensitive_positions"] += len(unsupported)
    assert summary["skipped"] == expected_counts
    assert summary["mean_k"] == pytest.approx(np.mean([line["k"] for line in written]))
    assert summary["samples_per_s"] > 0
    assert summary["args"]["replacement"] == "deprived-contrast-uncut" and summary["args"]["min_sensitivity"] == 0.0
    # what the lists are: pairs for each MLPO term, and who was skipped, by answer kind
    ks = [line["k"] for line in written]
    assert summary["explicit_pairs"] == sum(ks) and summary["implicit_pairs"] == sum(k * (k - 1) // 2 for k in ks)
    assert summary["k_counts"] == {str(k): ks.count(k) for k in sorted(set(ks))}
    kinds = summary["by_answer_kind"]
    assert sum(kind["written"] for kind in kinds.values()) == len(good_ids)
    assert kinds["yes/no"]["samples"] == sum(QA[i % len(QA)][1] in ("yes", "no") for i in range(NUM_GOOD))
    assert summary["scans"] is None  # this data does not say which images are normal
    assert {line["answer_kind"] for line in written} <= {"yes/no", "single-token", "multi-token"}

    for line in written:
        question, answer = (entries[line["id"]]["conversations"][i]["value"] for i in (0, 1))
        assert line["prompt"] == question.removeprefix("<image>\n") and line["responses"][0] == answer
        assert line["answer_type"] == entries[line["id"]]["answer_type"]
        k = line["k"]
        assert 1 <= k <= 3 and len(line["responses"]) == len(line["similarity"]) == k + 1
        assert line["similarity"][0] == 1.0
        ladder = line["similarity"][1:]
        assert all(a - b >= 0.1 for a, b in zip(ladder, ladder[1:])), line["similarity"]
        assert len({r.casefold() for r in line["responses"]}) == k + 1
        # Parallel mode: sensitive positions by descending s_t, at most top_n, replacements differ from the token.
        sensitive = line["sensitive"]
        assert 1 <= len(sensitive) <= 10
        assert [t["sensitivity"] for t in sensitive] == sorted((t["sensitivity"] for t in sensitive), reverse=True)
        assert all(t["replacement_id"] != t["token_id"] for t in sensitive)
        assert len({t["position"] for t in sensitive}) == len(sensitive)
        assert all(n in {-(-m * len(sensitive) // 5) for m in range(1, 6)} for n in line["num_replaced"])
        assert 1 <= line["variants_considered"] <= 5
        assert line["args_fingerprint"] == summary["args_fingerprint"]


def test_similarities_are_the_embedding_models(reference_run, cached_similarity):
    lines = read_jsonl(reference_run)[:6]
    recomputed = cached_similarity.similarities([line["responses"][0] for line in lines],
                                                [line["responses"][1:] for line in lines])
    for line, values in zip(lines, recomputed):
        assert line["similarity"][1:] == pytest.approx(values, abs=1e-5)


def test_rerun_of_finished_output_changes_nothing_and_other_args_are_refused(reference_run, tmp_path, tiny_model_dir,
                                                                            dataset, capsys):
    out = tmp_path / "prefs.jsonl"
    paths, reference = pipeline.OutputPaths(out), pipeline.OutputPaths(reference_run)
    out.write_bytes(reference.out.read_bytes())
    paths.skipped.write_bytes(reference.skipped.read_bytes())
    assert generate.main(argv(tiny_model_dir, dataset, out)) == 0  # nothing to do: no model is even loaded
    assert out.read_bytes() == reference.out.read_bytes()
    assert paths.skipped.read_bytes() == reference.skipped.read_bytes()
    assert json.loads(paths.summary.read_text())["processed_this_run"] == 0
    assert generate.main(argv(tiny_model_dir, dataset, out, "--beta", "0.5")) == 2
    assert re.search("other settings: beta 0.9 then, 0.5 now", capsys.readouterr().err)
    # the rule, the threshold and the perturbation are part of the fingerprint; naming the defaults changes nothing
    assert generate.main(argv(tiny_model_dir, dataset, out, "--replacement", "deprived-contrast-uncut",
                              "--perturbation", "visual-token", "--min-sensitivity", "0")) == 0
    assert out.read_bytes() == reference.out.read_bytes()
    for flags in (["--replacement", "deprived-contrast"], ["--literal-top-n"], ["--perturbation", "patch"]):
        assert generate.main(argv(tiny_model_dir, dataset, out, *flags)) == 2
        assert re.search("other settings: ", capsys.readouterr().err)


def test_resume_refuses_other_settings_or_edited_records_and_names_them(tmp_path, tiny_model_dir, dataset,
                                                                       cached_similarity, capsys):
    """A rerun into the same --out with another image folder, batch size or an edited input record would mix two
    runs' results in one file: refused before the model loads, naming what differs, with nothing changed. More
    samples (--num-samples) are new work, not a conflict."""
    import shutil

    data = tmp_path / "sft.json"
    wanted = {f"g{index}" for index in range(6)}
    entries = json.loads(json.dumps([entry for entry in dataset["entries"] if entry["id"] in wanted][:6]))
    data.write_text(json.dumps(entries))
    out = tmp_path / "prefs.jsonl"
    base = ["--model", str(tiny_model_dir), "--data", str(data), "--image-folder", str(dataset["images"]),
            "--out", str(out), "--batch-size", "4", "--max-length", str(dataset["max_length"])]
    assert generate.main([*base, "--num-samples", "4"]) == 0
    paths = pipeline.OutputPaths(out)
    before = {path: path.read_bytes() for path in (paths.out, paths.skipped, paths.settings)}

    copied = shutil.copytree(dataset["images"], tmp_path / "other-images")
    refusals = [(["--image-folder", str(copied)], r"image_folder '.*images' then, '.*other-images' now"),
                (["--batch-size", "2"], "batch_size 4 then, 2 now")]
    for flags, named in refusals:
        assert generate.main([*base, "--num-samples", "4", *flags]) == 2
        error = capsys.readouterr().err
        assert re.search(f"{out} was made with other settings: {named}", error), error
    entries[2]["conversations"][1]["value"] = "an edited answer"
    data.write_text(json.dumps(entries))
    assert generate.main([*base, "--num-samples", "4"]) == 2
    assert re.search(r"1 input record\(s\) changed since they were processed \('g2'\)", capsys.readouterr().err)
    assert {path: path.read_bytes() for path in before} == before

    entries[2] = dataset["entries"][2]
    data.write_text(json.dumps(entries))
    assert generate.main([*base, "--num-samples", "6"]) == 0  # two more samples: resumed, not refused
    summary = json.loads(paths.summary.read_text())
    assert summary["processed_this_run"] == 2 and summary["selected"] == 6


def test_sequential_mode_show_and_num_samples(tmp_path, tiny_model_dir, dataset, cached_similarity, capsys):
    out = tmp_path / "seq.jsonl"
    assert generate.main(argv(tiny_model_dir, dataset, out, "--mode", "sequential", "--num-samples", "7",
                              "--top-n", "3", "--num-variants", "3", "--show", "2",
                              "--literal-top-n")) == 0  # every sample of the random model has a sensitive position
    written = read_jsonl(out)
    summary = json.loads(pipeline.OutputPaths(out).summary.read_text())
    # The first 7 records the reader accepts, minus those skipped later; input-stage skips are still all listed.
    valid = [e["id"] for e in dataset["entries"]
             if e["id"] != "empty" and not (e["id"] == "g1" and e["image"] == "g4.png")]
    skipped_later = {i for i, (stage, _) in EXPECTED_SKIPS.items() if stage == "generate"}
    assert [line["id"] for line in written] == [i for i in valid[:7] if i not in skipped_later]
    assert summary["selected"] == 7 and summary["not_selected"] == len(valid) - 7
    assert summary["read"] == summary["written"] + summary["skipped_total"] + summary["not_selected"]
    assert all(len(line["sensitive"]) <= 3 for line in written)
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "── g0" in text and "── g1" in text and "── g2" not in text
    assert "y_l1" in text and "[" in text and "similarity" in text


def test_resume_after_kill_gives_identical_files(reference_run, tmp_path, tiny_model_dir, dataset, cached_similarity):
    out = tmp_path / "prefs.jsonl"
    command = [sys.executable, "-m", "hscr_fast.generate", *argv(tiny_model_dir, dataset, out)]
    # Not the repository root as working directory: `python -m` would put it first on sys.path.
    process = subprocess.Popen(command, env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, lines_seen = time.monotonic() + 240, 0
    while time.monotonic() < deadline and process.poll() is None:
        lines_seen = out.read_bytes().count(b"\n") if out.is_file() else 0
        if lines_seen >= 6:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stderr = process.stderr.read().decode()
    process.stderr.close()
    content = out.read_bytes()
    lines_at_kill = content.count(b"\n")
    assert 6 <= lines_at_kill < NUM_GOOD, (f"the run was not killed mid-way: {lines_seen} lines seen, {lines_at_kill} "
                                           f"at the kill, {len(content)} bytes {content[:200]!r}\n{stderr[-2000:]}")
    with out.open("ab") as handle:  # as if killed in the middle of a write
        handle.write(b'{"id": "g47", "image": "g4')

    # The resumed run is in-process (same code path, no second interpreter start-up).
    assert generate.main(argv(tiny_model_dir, dataset, out)) == 0
    summary = json.loads(pipeline.OutputPaths(out).summary.read_text())
    assert summary["processed_this_run"] < NUM_GOOD + 3  # finished ids were not redone
    reference = pipeline.OutputPaths(reference_run)
    assert out.read_bytes() == reference.out.read_bytes()
    assert pipeline.OutputPaths(out).skipped.read_bytes() == reference.skipped.read_bytes()


@pytest.mark.slow  # 15-40 s with the load: three interpreters (launcher + 2 ranks) import torch + transformers
def test_torchrun_two_cpu_processes_match_one(reference_run, tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "prefs.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "hscr_fast.generate", *argv(tiny_model_dir, dataset, out)]
    result = subprocess.run(command, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    paths, reference = pipeline.OutputPaths(out), pipeline.OutputPaths(reference_run)
    assert out.read_bytes() == reference.out.read_bytes()
    assert paths.skipped.read_bytes() == reference.skipped.read_bytes()
    assert json.loads(paths.summary.read_text())["world_size"] == 2
    assert not list(tmp_path.glob(".*.part"))  # part files were merged and removed


def test_demo_world_is_the_default(tmp_path, tiny_model_dir, dataset, cached_similarity, monkeypatch):
    """With neither --model nor --data the command takes everything from `ensure_demo_world()` (stood in for by the
    tiny model and this module's data: building the real demo world takes minutes)."""
    import types

    import hscr_fast.demo

    world = types.SimpleNamespace(model_dir=tiny_model_dir, train_json=dataset["data"], image_folder=dataset["images"])
    monkeypatch.setattr(hscr_fast.demo, "ensure_demo_world", lambda: world, raising=False)
    out = tmp_path / "demo.jsonl"
    assert generate.main(["--out", str(out), "--num-samples", "4", "--batch-size", "4"]) == 0
    summary = json.loads(pipeline.OutputPaths(out).summary.read_text())
    assert summary["selected"] == 4 and summary["written"] >= 2
    assert summary["args"]["model"] == str(tiny_model_dir) and summary["args"]["image_folder"] == str(dataset["images"])


def test_stage1_flags_reach_the_config_and_the_kernel(tiny_vlm, cached_similarity, dataset, monkeypatch):
    import importlib

    from hscr_fast.data.records import VQARecord

    # the module, not the function hscr_fast.kernels re-exports under the same name
    kernel_module = importlib.import_module("hscr_fast.kernels.contrastive_select")
    seen = []
    kernel = kernel_module.contrastive_select_from_hidden

    def recording_kernel(*args, **kwargs):
        seen.append((kwargs["rule"], kwargs["alpha_drop"], kwargs["min_sensitivity"]))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "contrastive_select_from_hidden", recording_kernel)
    record = VQARecord(id="g0", image="g0.png", question=QA[1][0], answer=QA[1][1])
    for flags, expected in (([], ("deprived", 0.0, 0.0)),
                            (["--replacement", "pdiff-ascending", "--min-sensitivity", "0.3"], ("pdiff", 0.0, 0.3)),
                            (["--replacement", "deprived-contrast", "--literal-top-n"], ("deprived", None, None))):
        config = generate.GenerateConfig.from_args(flags)
        builder = pipeline.PreferenceBuilder(config, tiny_vlm, cached_similarity, dataset["images"], "fingerprint")
        seen.clear()
        builder.build(builder.load([record]))
        assert seen and set(seen) == {expected}
    config = generate.GenerateConfig.from_args(["--perturbation", "latent", "--drop-ratio", "0.5"])
    builder = pipeline.PreferenceBuilder(config, tiny_vlm, cached_similarity, dataset["images"], "fingerprint")
    assert builder.contrast.perturb.perturbation == "latent" and builder.contrast.perturb.drop_ratio == 0.5
    assert builder.build(builder.load([record])).records  # the latent-masked condition scores and lists


def test_command_names_are_the_librarys():
    from hscr_fast.models.perturbation import PERTURBATIONS
    from hscr_fast.preferences.selfcontrast import REPLACEMENT_RULES

    assert generate.PERTURBATIONS == PERTURBATIONS and generate.REPLACEMENT_RULES == tuple(REPLACEMENT_RULES)


def test_perturbation_a_family_cannot_express_is_refused_before_the_model_loads(tmp_path, capsys):
    model = tmp_path / "llava-next"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlavaNextForConditionalGeneration"]}')
    from safetensors.torch import save_file

    save_file({"stand_in": torch.zeros(1)}, model / "model.safetensors")  # complete files: the flag is what fails
    (tmp_path / "sft.json").write_text("[]")
    code = generate.main(["--model", str(model), "--data", str(tmp_path / "sft.json"), "--perturbation", "patch",
                          "--out", str(tmp_path / "out" / "x.jsonl")])
    assert code == 2 and "several tiles" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_refused(tmp_path, capsys, tiny_model_dir):
    assert generate.main(["--model", str(tmp_path), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert re.search("both --model and --data", capsys.readouterr().err)
    assert generate.main(["--batch-size", "0", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert re.search("--batch-size", capsys.readouterr().err)
    assert generate.main(["--drop-ratio", "1", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert re.search("--drop-ratio must be in", capsys.readouterr().err)
    assert generate.main(["--num-alternatives", "-1", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert re.search("--num-alternatives must be", capsys.readouterr().err)
    assert generate.main(["--model", str(tmp_path / "missing"), "--data", "sft.json",
                          "--out", str(tmp_path / "x.jsonl")]) == 2
    assert re.search("no such directory", capsys.readouterr().err)
    (tmp_path / "sft.json").write_text('{"id": 1}')
    assert generate.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "sft.json"), "--out",
                          str(tmp_path / "x.jsonl")]) == 2
    assert "sft.json: expected a JSON list" in capsys.readouterr().err


def test_special_tokens_are_never_replacements(tiny_llava, tiny_model_dir, dataset, cached_similarity):
    """Edit the lm_head so that EOS is what the model says at "yes" without the image and is plausible with it: the
    replacement rule would pick EOS ("yes" → nothing), but special tokens are never replacements, so the variant is a
    real token and the list is written."""
    import copy

    from hscr_fast.data.records import VQARecord
    from hscr_fast.models.vlm import VisionLanguageModel

    model, processor = tiny_llava
    vlm = VisionLanguageModel(copy.deepcopy(model), processor)
    config = generate.GenerateConfig.from_args(["--top-n", "1", "--num-variants", "1", "--literal-top-n"])
    builder = pipeline.PreferenceBuilder(config, vlm, cached_similarity, dataset["images"], "fingerprint")
    record = VQARecord(id="closed", image="g0.png", question="Is there a lesion in the left lung?", answer="yes")
    loaded = builder.load([record])
    sample = builder.contrast.prepare(record.id, record.question, record.answer)
    visual = vlm.encode_images(loaded.pixel_values)
    (h_full, h_drop), = builder.contrast.answer_hidden_pairs([sample], [sample.answer_ids], visual)
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        weight = vlm.lm_head_weight
        hidden = torch.stack([h_full[0], h_drop[0]]).double()
        targets = torch.stack([(weight @ h_full[0]).max() - 0.5, (weight @ h_drop[0]).max() + 8.0]).double()
        weight[eos] = torch.linalg.lstsq(hidden, targets[:, None]).solution[:, 0].float()
        (h_full, h_drop), = builder.contrast.answer_hidden_pairs([sample], [sample.answer_ids], visual)
        # without the exclusion, EOS is the rule's choice at "yes"
        from hscr_fast.kernels import contrastive_select_from_hidden

        plain = contrastive_select_from_hidden(h_full, h_drop, weight, torch.tensor(sample.answer_ids), top_n=1)
        assert plain.replacement[0].item() == eos
    output = builder.build(loaded)
    special = set(processor.tokenizer.all_special_ids)
    assert [line["id"] for line in output.records] == ["closed"] and output.skips == []
    assert all(token["replacement_id"] not in special for token in output.records[0]["sensitive"])
    assert output.records[0]["responses"][1].strip()
