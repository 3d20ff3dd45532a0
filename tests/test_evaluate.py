"""hscr_fast.evaluate: batched = unbatched answers, resume = fresh run, scoring of hand-made answer files, the visual
conditions, adapters (right base and wrong base), clear errors for bad input, VQA-RAD / SLAKE end to end."""
import json
import shutil

import pytest
import torch
from helpers import make_images

import hscr_fast.evaluation.generation as generation
from hscr_fast.data.records import VQARecord, write_llava_med_json
from hscr_fast.evaluate import main
from hscr_fast.evaluation.generation import GenerationPrompt, decode, greedy_generate
from hscr_fast.evaluation.run import (
    AdapterMismatchError,
    VisualCondition,
    apply_adapter,
    evaluate_model,
    evaluate_with_and_without_visual,
    read_predictions,
    run_labels,
)
from hscr_fast.models.dropout import visual_dropout
from hscr_fast.models.vlm import load_vlm

QUESTIONS = [
    ("Is there a lesion in the left lung?", "yes", "CLOSED", "CHEST"),
    ("Where is the abnormality?", "right upper lobe", "OPEN", "CHEST"),
    ("What organ is shown in this image?", "lung", "OPEN", "CHEST"),
    ("How many lesions are there?", "two", "OPEN", "HEAD"),
    ("Is this a normal image?", "no", "CLOSED", "HEAD"),
    ("What modality is used?", "CT", "OPEN", "HEAD"),
    ("Is there an effusion?", "no", "CLOSED", "ABD"),
]


def _write_set(folder, images, questions=QUESTIONS):
    """A LLaVA-Med JSON test set; questions cycle over the images (several questions per image, as in VQA-RAD)."""
    image_folder = folder / "images"
    image_folder.mkdir(parents=True)
    for index, image in enumerate(images):
        image.save(image_folder / f"scan{index}.png")
    records = [VQARecord(id=f"q{index}", image=f"scan{index % len(images)}.png", question=question, answer=answer,
                         answer_type=answer_type, metadata={"organ": organ})
               for index, (question, answer, answer_type, organ) in enumerate(questions)]
    write_llava_med_json(folder / "test.json", records)
    return folder / "test.json", image_folder


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    return _write_set(tmp_path_factory.mktemp("eval_set"), make_images(4, seed=5))


def _args(model_dir, data, image_folder, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--image-folder", str(image_folder), "--out", str(out),
            "--max-new-tokens", "6", "--no-progress", *map(str, extra)]


def _predictions(out):
    return {question_id: entry for question_id, (_, entry) in read_predictions(out / "predictions.jsonl").items()}


def _scores(out):
    """A run's scores, without what only a generating run records: its settings and the images it could not read."""
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("run")
    metrics.pop("skipped_unreadable_images", None)
    return metrics


@pytest.fixture(scope="module")
def saved_vlm(tiny_model_dir):
    """The checkpoint the command evaluates, loaded once for reference generations."""
    return load_vlm(tiny_model_dir)


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory, tiny_model_dir, eval_set):
    out = tmp_path_factory.mktemp("fresh_run")
    assert main(_args(tiny_model_dir, *eval_set, out, "--batch-size", 3)) == 0
    return out


def test_batched_and_unbatched_give_identical_predictions(fresh_run, tiny_model_dir, eval_set, tmp_path):
    assert main(_args(tiny_model_dir, *eval_set, tmp_path, "--batch-size", 1)) == 0
    batched, unbatched = _predictions(fresh_run), _predictions(tmp_path)
    assert list(batched) == [f"q{index}" for index in range(len(QUESTIONS))]
    assert {qid: p["text"] for qid, p in batched.items()} == {qid: p["text"] for qid, p in unbatched.items()}
    assert any(p["text"] for p in batched.values())  # the tiny model does say something
    first = batched["q0"]
    assert (first["prompt"], first["answer"], first["answer_type"], first["metadata"]) == \
        (QUESTIONS[0][0], "yes", "CLOSED", {"organ": "CHEST"})
    metrics = json.loads((fresh_run / "metrics.json").read_text())
    assert (metrics["num_closed"], metrics["num_open"]) == (3, 4)
    assert set(metrics["by_organ"]) == {"ABD", "CHEST", "HEAD"}
    for key in ("closed_accuracy", "closed_accuracy_yes_no", "closed_exact", "open_recall", "open_exact"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["run"]["visual"] == "full" and metrics["run"]["max_new_tokens"] == 6
    assert "| closed accuracy" in (fresh_run / "metrics.md").read_text()


def test_batched_answers_match_direct_generation(fresh_run, saved_vlm, eval_set):
    """The command's answers are what greedy_generate gives each question alone with its image."""
    from PIL import Image

    vlm = saved_vlm
    data, image_folder = eval_set
    expected = {}
    for index, (question, *_rest) in enumerate(QUESTIONS[:3]):
        image = Image.open(image_folder / f"scan{index % 4}.png").convert("RGB")
        visual = vlm.encode_images(vlm.preprocess_images([image]))[0].detach()
        tokens = greedy_generate(vlm, [GenerationPrompt(vlm.prompt_tokens(question), visual)], max_new_tokens=6)[0]
        expected[f"q{index}"] = decode(vlm, tokens)
    predictions = _predictions(fresh_run)
    assert {qid: predictions[qid]["text"] for qid in expected} == expected


def test_resume_after_interruption_and_torn_line_equals_fresh_run(fresh_run, tiny_model_dir, eval_set, tmp_path,
                                                                   monkeypatch):
    calls = []
    real_generate = generation.greedy_generate

    def interrupted_generate(vlm, items, **kwargs):
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second batch
        return real_generate(vlm, items, **kwargs)

    monkeypatch.setattr(generation, "greedy_generate", interrupted_generate)
    with pytest.raises(KeyboardInterrupt):
        main(_args(tiny_model_dir, *eval_set, tmp_path, "--batch-size", 3))
    predictions_path = tmp_path / "predictions.jsonl"
    assert len(predictions_path.read_text().splitlines()) == 3  # the first batch was kept, line by line
    with predictions_path.open("a") as handle:  # and a half-written fourth line
        handle.write('{"question_id": "q3", "prompt": "How many le')

    calls.clear()
    monkeypatch.setattr(generation, "greedy_generate", lambda vlm, items, **kw: calls.append(len(items)) or
                        real_generate(vlm, items, **kw))
    assert main(_args(tiny_model_dir, *eval_set, tmp_path, "--batch-size", 3)) == 0
    assert sum(calls) == len(QUESTIONS) - 3  # only the missing questions were generated
    assert _predictions(tmp_path) == _predictions(fresh_run)
    assert _scores(tmp_path) == _scores(fresh_run)
    assert json.loads((tmp_path / "metrics.json").read_text())["run"]["generated_this_call"] == 4


def test_resume_with_other_settings_is_refused_and_keeps_the_file(fresh_run, tiny_model_dir, eval_set, tmp_path,
                                                                   capsys):
    out = tmp_path / "run"
    shutil.copytree(fresh_run, out)
    before = (out / "predictions.jsonl").read_bytes()
    assert main(_args(tiny_model_dir, *eval_set, out, "--max-new-tokens", 3)) == 2
    error = capsys.readouterr().err
    assert "max_new_tokens: 6 there, 3 now" in error and "predictions.jsonl" in error
    assert (out / "predictions.jsonl").read_bytes() == before



def test_resume_refusal_names_each_answer_setting_and_lets_the_others_change(fresh_run, tiny_model_dir, eval_set,
                                                                            tmp_path, monkeypatch):
    """The settings that change the answers must match run.json (named, then and now, in one SettingsChangedError);
    the batch size, device and --limit may differ on resume."""
    from hscr_fast.runtime.resume import SettingsChangedError

    out = tmp_path / "run"
    shutil.copytree(fresh_run, out)
    before = (out / "predictions.jsonl").read_bytes()
    monkeypatch.setattr("hscr_fast.evaluation.run.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SettingsChangedError, match=r"predictions\.jsonl was made with other settings: drop_ratio: 0\.0 "
                                                   r"there, 0\.25 now; seed: 0 there, 3 now; use another --out, or the "
                                                   r"same settings to resume"):
        evaluate_model(tiny_model_dir, eval_set[0], eval_set[1], out, visual=VisualCondition("full", 0.25, "remove", 3),
                       max_new_tokens=6, batch_size=3, progress=False)
    assert (out / "predictions.jsonl").read_bytes() == before
    monkeypatch.undo()
    assert main(_args(tiny_model_dir, *eval_set, out, "--batch-size", 2, "--limit", 5, "--device", "cpu")) == 0
    assert (out / "predictions.jsonl").read_bytes() == before  # every answer was there: nothing generated again


# -- scoring an existing answer file -------------------------------------------------------------------------------

HAND_DATA = [  # (id, answer, answer_type, organ, prediction)
    ("c1", "yes", "CLOSED", "CHEST", "Yes, there is."),  # substring hit, not exact
    ("c2", "no", "CLOSED", "CHEST", "It is not visible"),  # "no" occurs in "not": a substring hit (LLaVA-Med's quirk)
    ("c3", "yes", "CLOSED", "HEAD", "no"),  # wrong
    ("c4", "no", "CLOSED", "HEAD", "No."),  # exact after normalisation
    ("o1", "right lung", "OPEN", "CHEST", "The left lung"),  # recall 1/2
    ("o2", "two", "OPEN", "HEAD", "2"),  # number word = digit: exact
    ("o3", "CT", "OPEN", "HEAD", ""),  # empty prediction scores 0
]


@pytest.fixture
def hand_data(tmp_path):
    records = [VQARecord(id=qid, image="x.png", question=f"question {qid}?", answer=answer, answer_type=answer_type,
                         metadata={"organ": organ}) for qid, answer, answer_type, organ, _ in HAND_DATA]
    write_llava_med_json(tmp_path / "test.json", records)
    return tmp_path / "test.json"


def _write_answers(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _llava_med_answers(tmp_path, rows=None):
    rows = rows if rows is not None else [
        {"question_id": qid, "prompt": "...", "text": prediction, "answer_id": f"a{qid}", "model_id": "m",
         "metadata": {}} for qid, *_, prediction in HAND_DATA]
    return _write_answers(tmp_path / "answers.jsonl", rows)


def test_score_a_hand_made_answer_file_without_loading_a_model(hand_data, tmp_path, monkeypatch):
    import hscr_fast.evaluation.run as evaluate

    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("--predictions must not load a model"))
    answers = _llava_med_answers(tmp_path)
    out = tmp_path / "scored"
    assert main(["--predictions", str(answers), "--data", str(hand_data), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["closed_accuracy"] == pytest.approx(75.0)
    assert metrics["closed_accuracy_yes_no"] == pytest.approx(75.0)
    assert metrics["closed_exact"] == pytest.approx(25.0)
    assert metrics["open_recall"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    assert metrics["open_exact"] == pytest.approx(100 / 3)
    assert (metrics["num_closed"], metrics["num_open"], metrics["num_questions"]) == (4, 3, 7)
    chest = metrics["by_organ"]["CHEST"]
    assert (chest["closed_accuracy"], chest["open_recall"], chest["num_open"]) == (100.0, 50.0, 1)
    assert "| closed accuracy (substring, LLaVA-Med) | 75.00 |" in (out / "metrics.md").read_text()


def test_score_with_limit_scores_only_the_first_questions(hand_data, tmp_path):
    rows = [{"question_id": qid, "text": prediction} for qid, *_, prediction in HAND_DATA[:2]]
    answers = _write_answers(tmp_path / "answers.jsonl", rows)
    assert main(["--predictions", str(answers), "--data", str(hand_data), "--limit", "2"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # --out defaults to the answers' folder
    assert (metrics["num_questions"], metrics["closed_accuracy"]) == (2, 100.0)


@pytest.mark.parametrize("mutate, expected", [
    (lambda rows: rows + [{"question_id": "zz9", "text": "yes"}],
     ["1 prediction id(s) are not in", "'zz9' (line 8)", "test.json"]),
    (lambda rows: rows + [dict(rows[2])], ["answers.jsonl:8", "'c3' is duplicated (first on line 3)"]),
    (lambda rows: rows[:5], ["no prediction for 2 of the 7 questions", "'o2', 'o3'"]),
    (lambda rows: rows[:1] + [{"question_id": "c2"}] + rows[2:], ["answers.jsonl:2", "no 'text'"]),
    (lambda rows: rows[:1] + [{"id": "c2", "text": "no"}] + rows[2:], ["answers.jsonl:2", "no 'question_id'"]),
    (lambda rows: rows[:1] + [{"question_id": "c2", "text": ["no"]}] + rows[2:],
     ["answers.jsonl:2", "'text' must be a string"]),
])
def test_bad_answer_files_name_what_is_wrong(hand_data, tmp_path, capsys, mutate, expected):
    rows = [{"question_id": qid, "text": prediction} for qid, *_, prediction in HAND_DATA]
    answers = _write_answers(tmp_path / "answers.jsonl", mutate(rows))
    assert main(["--predictions", str(answers), "--data", str(hand_data), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and all(part in error for part in expected), error
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_invalid_json_line_in_answers(hand_data, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": "c1", "text": "yes"}\n{"question_id": "c2", "text": no}\n')
    assert main(["--predictions", str(answers), "--data", str(hand_data)]) == 2
    assert "answers.jsonl:2: invalid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("content, expected", [
    ('{"id": "a", "image": "x.png", "conversations": []}\n{"id": "b"}\n', "looks like JSONL"),
    ('{"questions": []}', "got a JSON object with keys [questions]"),
    ('[{"id": "a", "image": "x.png", "question": "Is it?", "answer": "yes"}]', "record 0 (id 'a')"),
    ("[]", "no questions to evaluate"),
])
def test_data_file_of_the_wrong_format(tmp_path, capsys, content, expected):
    data = tmp_path / "bad.json"
    data.write_text(content)
    answers = _write_answers(tmp_path / "answers.jsonl", [{"question_id": "a", "text": "yes"}])
    assert main(["--predictions", str(answers), "--data", str(data)]) == 2
    error = capsys.readouterr().err
    assert "bad.json" in error and expected in error, error


def test_missing_arguments_are_named(tmp_path, eval_set, tiny_model_dir, capsys):
    assert main(["--model", str(tiny_model_dir), "--data", str(eval_set[0]), "--out", str(tmp_path)]) == 2
    assert "--image-folder is required" in capsys.readouterr().err
    assert main(["--predictions", str(tmp_path / "a.jsonl")]) == 2
    assert "--predictions needs --data" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, *eval_set, tmp_path, "--visual", "none", "--drop-ratio", "0.5")) == 2
    assert "--drop-ratio needs the image" in capsys.readouterr().err


# -- visual conditions ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("condition", [
    VisualCondition("none"),
    VisualCondition("full", drop_ratio=0.7, dropout_mode="mask", seed=3),
    VisualCondition("full", drop_ratio=0.5, dropout_mode="remove", seed=1),
])
def test_visual_conditions_generate_what_they_say(tiny_model_dir, saved_vlm, eval_set, tmp_path, condition):
    """--visual none = no visual tokens at all; --drop-ratio = Stage 1's seeded dropout of that sample's tokens."""
    from PIL import Image

    data, image_folder = eval_set
    metrics = evaluate_model(tiny_model_dir, data, image_folder, tmp_path, visual=condition, batch_size=2,
                             max_new_tokens=6, limit=3, progress=False)
    assert metrics["num_questions"] == 3 and metrics["run"]["visual"] == condition.mode
    vlm = saved_vlm
    for index, (question, *_rest) in enumerate(QUESTIONS[:3]):
        if condition.mode == "none":
            visual, attendable = torch.empty(0, vlm.hidden_size), None
        else:
            image = Image.open(image_folder / f"scan{index}.png").convert("RGB")
            tokens = vlm.encode_images(vlm.preprocess_images([image]))[0].detach()
            dropout = visual_dropout(tokens.shape[0], condition.drop_ratio, global_seed=condition.seed,
                                     sample_id=f"q{index}", mode=condition.dropout_mode)
            visual, attendable = dropout.apply(tokens)
        tokens = greedy_generate(vlm, [GenerationPrompt(vlm.prompt_tokens(question), visual, attendable)],
                                 max_new_tokens=6)[0]
        assert _predictions(tmp_path)[f"q{index}"]["text"] == decode(vlm, tokens)


# -- adapters ------------------------------------------------------------------------------------------------------

def _save_lora(model_dir, adapter_dir, seed=0):
    """A LoRA adapter with random (non-zero) weights on the language model's attention and MLP projections."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    vlm = load_vlm(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    peft_model = get_peft_model(vlm.model, config)
    peft_model.save_pretrained(adapter_dir)
    return vlm, peft_model


def test_adapter_is_applied_like_merged_weights(tiny_model_dir, eval_set, fresh_run, tmp_path):
    vlm, peft_model = _save_lora(tiny_model_dir, tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged_dir)
    vlm.processor.save_pretrained(merged_dir)

    assert main(_args(tiny_model_dir, *eval_set, tmp_path / "with_adapter", "--adapter", tmp_path / "adapter",
                      "--limit", 4, "--batch-size", 4)) == 0
    assert main(_args(merged_dir, *eval_set, tmp_path / "merged_run", "--limit", 4, "--batch-size", 4)) == 0
    with_adapter, merged = _predictions(tmp_path / "with_adapter"), _predictions(tmp_path / "merged_run")
    assert {q: p["text"] for q, p in with_adapter.items()} == {q: p["text"] for q, p in merged.items()}
    base = _predictions(fresh_run)
    assert any(with_adapter[q]["text"] != base[q]["text"] for q in with_adapter)
    run = json.loads((tmp_path / "with_adapter" / "run.json").read_text())
    assert run["adapter"] == str((tmp_path / "adapter").resolve())


def test_before_after_report_from_a_model_in_memory(tiny_model_dir, eval_set, fresh_run, tmp_path):
    """The trainer's path: one peft-wrapped model, the reference = adapter disabled, then the demo report."""
    from hscr_fast.data.records import load_llava_med_json
    from hscr_fast.evaluation.report import write_demo_report

    vlm, peft_model = _save_lora(tiny_model_dir, tmp_path / "adapter")
    vlm.model = peft_model
    vlm.model.train()  # as the trainer leaves it; evaluation must switch dropout off and restore the mode
    records = load_llava_med_json(*eval_set)[0][:4]
    image_folder = eval_set[1]
    results = {}
    with vlm.adapter_disabled():
        results["before HSCR"] = evaluate_with_and_without_visual(
            vlm, records, tmp_path / "before", image_folder=image_folder, run={"model": "tiny"}, max_new_tokens=6,
            progress=False)
    results["after HSCR"] = evaluate_with_and_without_visual(
        vlm, records, tmp_path / "after", image_folder=image_folder, run={"model": "tiny", "adapter": "lora"},
        max_new_tokens=6, progress=False)
    assert vlm.model.training
    # the reference model is the base model: same answers as the command gave without an adapter
    before, base = _predictions(tmp_path / "before" / "with_visual"), _predictions(fresh_run)
    assert {q: p["text"] for q, p in before.items()} == {q: base[q]["text"] for q in ("q0", "q1", "q2", "q3")}
    assert json.loads((tmp_path / "after" / "without_visual" / "run.json").read_text())["visual"] == "none"
    md_path, png_path = write_demo_report(tmp_path / "report", results)
    assert md_path.read_text().count("| after HSCR |") == 3  # with, without, gain
    assert png_path.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def other_base_adapters(tmp_path_factory):
    """Adapters made for tiny models other than the test model: wider (hidden 96), and deeper (3 layers)."""
    from hscr_fast.models.tiny import TinyLlavaSpec, save_tiny_llava

    root = tmp_path_factory.mktemp("other_bases")
    wider = save_tiny_llava(root / "wider_base", TinyLlavaSpec(text_hidden=96))
    deeper = save_tiny_llava(root / "deeper_base", TinyLlavaSpec(text_layers=3))
    _save_lora(wider, root / "wider_adapter")
    _save_lora(deeper, root / "deeper_adapter")
    return root


def test_adapter_for_another_base_model_is_named(tiny_model_dir, eval_set, other_base_adapters, tmp_path, capsys):
    root = other_base_adapters
    assert main(_args(tiny_model_dir, *eval_set, tmp_path, "--adapter", root / "wider_adapter")) == 2
    error = capsys.readouterr().err
    assert "wider_adapter was made for base model" in error and "text_config.hidden_size 96 vs 64" in error

    # The base folder gone (or named by a hub id): the weight shapes still tell.
    moved = tmp_path / "wider_adapter_moved"
    shutil.copytree(root / "wider_adapter", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert main(_args(tiny_model_dir, *eval_set, tmp_path, "--adapter", moved)) == 2
    error = capsys.readouterr().err
    assert "wider_adapter_moved does not fit --model" in error and "size mismatch" in error


def test_adapter_with_layers_the_model_lacks(tiny_model_dir, other_base_adapters):
    """Same widths, one more layer: peft alone would load it silently and drop the third layer's weights."""
    vlm = load_vlm(tiny_model_dir)
    adapter = other_base_adapters / "deeper_adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match=r"deeper_adapter does not fit .* no place in the model, e\.g\. "
                                                   r".*layers\.2\."):
        apply_adapter(vlm, adapter, tiny_model_dir)


def test_not_an_adapter_folder(tiny_model_dir, eval_set, tmp_path, capsys):
    assert main(_args(tiny_model_dir, *eval_set, tmp_path / "o", "--adapter", tmp_path)) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


# -- compare -------------------------------------------------------------------------------------------------------

def test_compare_runs_draws_a_chart(fresh_run, hand_data, tmp_path, capsys):
    answers = _llava_med_answers(tmp_path)
    assert main(["--predictions", str(answers), "--data", str(hand_data), "--out", str(tmp_path / "hand")]) == 0
    out = tmp_path / "cmp"
    assert main(["--compare", str(fresh_run), str(tmp_path / "hand"), "--out", str(out)]) == 0
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "comparison.md").read_text()
    assert "| hand | 75.00 | 25.00 | 50.00 | 33.33 | 4 | 3 |" in table
    assert main(["--compare", str(tmp_path / "nothing_here"), "--out", str(out)]) == 2
    assert "nothing_here: no metrics.json" in capsys.readouterr().err
    assert main(["--compare", str(fresh_run), str(fresh_run) + "/", "--out", str(out)]) == 2
    assert "lists a run folder twice" in capsys.readouterr().err


def test_run_labels_are_the_shortest_distinct_path_ends():
    assert run_labels(["runs/a/eval", "runs/b/eval", "x/c"]) == ["a/eval", "b/eval", "x/c"]
    assert run_labels(["runs/base", "other/hscr"]) == ["base", "hscr"]


# -- real data, end to end -----------------------------------------------------------------------------------------

@pytest.mark.shared_data
@pytest.mark.parametrize("dataset, breakdowns", [("vqa-rad", {"by_organ", "by_question_type"}),
                                                 ("slake", {"by_modality", "by_question_type"})])
def test_real_med_vqa_sets_score_end_to_end(shared_data, tiny_model_dir, tmp_path, dataset, breakdowns):
    from hscr_fast.data.convert import convert

    convert(dataset, shared_data / dataset, tmp_path / "converted", validate_images=False)
    data, images = tmp_path / "converted" / "test.json", tmp_path / "converted" / "images"
    out = tmp_path / "eval"
    assert main(["--model", str(tiny_model_dir), "--data", str(data), "--image-folder", str(images), "--out",
                 str(out), "--limit", "8", "--batch-size", "4", "--max-new-tokens", "4", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_questions"] == 8 and metrics["num_closed"] + metrics["num_open"] == 8
    assert breakdowns <= set(metrics)
    predictions = _predictions(out)
    assert list(predictions) == [f"{dataset}-test-{index}" for index in range(8)]

    # The answer file scores the same through --predictions (as LLaVA-Med's own answer files would).
    assert main(["--predictions", str(out / "predictions.jsonl"), "--data", str(data), "--out", str(tmp_path / "s"),
                 "--limit", "8"]) == 0
    assert _scores(tmp_path / "s") == _scores(out)


def test_demo_world_is_the_default(tmp_path, monkeypatch, tiny_model_dir, eval_set):
    """With neither --model nor --data the command evaluates `ensure_demo_world()`'s model on its test set, into
    hscr_fast_runs/evaluate-demo/base. The world is stood in for by the tiny model and this module's test set:
    building the real one takes minutes and writes outside the test's folders."""
    import types

    import hscr_fast.demo

    data, image_folder = eval_set
    world = types.SimpleNamespace(model_dir=tiny_model_dir, test_json=data, image_folder=image_folder)
    monkeypatch.setattr(hscr_fast.demo, "ensure_demo_world", lambda: world, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["--limit", "4", "--max-new-tokens", "4", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "hscr_fast_runs" / "evaluate-demo" / "base" / "metrics.json").read_text())
    assert metrics["num_questions"] == 4
    assert metrics["run"]["model"] == str(tiny_model_dir.resolve())
    assert metrics["run"]["data"] == str(data.resolve())


def test_unreadable_test_image_is_skipped_named_and_counted(tmp_path, tiny_model_dir, capsys):
    """One corrupt image (asked about by q1 and q5) does not stop the run: the other questions are answered and scored,
    the two are named and counted in metrics.json and in the summary."""
    data, image_folder = _write_set(tmp_path / "set", make_images(4, seed=5))
    (image_folder / "scan1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir, data, image_folder, out, "--batch-size", 3)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_questions"] == len(QUESTIONS) - 2
    assert metrics["skipped_unreadable_images"] == {"count": 2, "ids": ["q1", "q5"]}
    assert set(_predictions(out)) == {f"q{index}" for index in range(len(QUESTIONS))} - {"q1", "q5"}
    assert "skipped 2 question(s) whose image cannot be read (not scored): 'q1', 'q5'" in capsys.readouterr().out
