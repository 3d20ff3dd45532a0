"""hscr_fast.data.convert: VQA-RAD and SLAKE converted from the real releases, PathVQA from a synthetic tree, and the
bad inputs the converters must count and skip instead of crashing on."""
import json
import os
import pickle
import subprocess
import sys
from collections import Counter, OrderedDict

import numpy as np
import pytest
from PIL import Image

from hscr_fast.data.convert import convert, main, normalize_answer
from hscr_fast.data.records import DataFormatError, count_skip_reasons, load_llava_med_json


def _load_back(out, split):
    records, skipped = load_llava_med_json(out / f"{split}.json", out / "images")
    assert skipped == []
    return records


def _check_common(records, dataset, split):
    ids = [record.id for record in records]
    assert len(set(ids)) == len(ids) and all(i.startswith(f"{dataset}-{split}-") for i in ids)
    assert {record.answer_type for record in records} == {"CLOSED", "OPEN"}
    assert all(record.answer == record.answer.strip() and record.answer for record in records)


def test_vqa_rad_full_conversion_from_the_command_line(shared_data, tmp_path):
    out = tmp_path / "vqa-rad"
    completed = subprocess.run(
        [sys.executable, "-m", "hscr_fast.data.convert", "vqa-rad", "--src", str(shared_data / "vqa-rad"),
         "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "train.json: 3064 records written; skipped 0" in completed.stdout
    assert "test.json: 451 records written; skipped 0" in completed.stdout

    source_train = json.loads((shared_data / "vqa-rad" / "trainset.json").read_text())
    train, test = _load_back(out, "train"), _load_back(out, "test")
    assert (len(train), len(test)) == (3064, 451)
    _check_common(train, "vqa-rad", "train")
    _check_common(test, "vqa-rad", "test")
    # Stray whitespace in answer_type (two "CLOSED " in the train set) is normalised, not a third category.
    source_types = Counter(entry["answer_type"].strip() for entry in source_train)
    assert Counter(record.answer_type for record in train) == source_types
    # Numeric answers arrive as strings, record order and organ/question type are kept.
    numeric = [i for i, entry in enumerate(source_train) if isinstance(entry["answer"], int)]
    assert numeric and all(train[i].answer == str(source_train[i]["answer"]) for i in numeric)
    assert train[0].id == "vqa-rad-train-0" and train[0].question == source_train[0]["question"].strip()
    assert train[0].metadata["organ"] == source_train[0]["image_organ"]
    assert train[0].metadata["question_type"] == source_train[0]["question_type"]
    assert {record.answer for record in train if record.answer.lower() in ("yes", "no")} == {"yes", "no"}
    # Exactly the referenced images were placed.
    referenced = {record.image for record in train + test}
    placed = {path.name for path in (out / "images").iterdir()}
    assert placed == referenced
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["splits"]["train"]["written"] == 3064 and report["images"]["count"] == len(referenced)


def test_slake_english_only_keeps_image_folders(shared_data, tmp_path):
    out = tmp_path / "slake"
    report = convert("slake", shared_data / "slake", out)
    splits = {split: _load_back(out, split) for split in ("train", "validate", "test")}
    # 4,919 / 1,053 / 1,061 English questions; one train record has an empty answer and is skipped, with its reason.
    assert {split: len(records) for split, records in splits.items()} == {"train": 4918, "validate": 1053, "test": 1061}
    assert count_skip_reasons(report.splits["train"].skipped) == {"non-English": 4916, "empty answer": 1}
    assert count_skip_reasons(report.splits["validate"].skipped) == {"non-English": 1046}
    assert count_skip_reasons(report.splits["test"].skipped) == {"non-English": 1033}
    empty = [s for s in report.splits["train"].skipped if s.reason == "empty answer"][0]
    assert "train.json: record 1622: answer is empty" in empty.message
    for split, records in splits.items():
        _check_common(records, "slake", split)
        assert all(set(record.metadata) >= {"modality", "location", "question_type"} for record in records)
    # Every SLAKE image is called source.jpg: the xmlabN/ folder must survive, one file per distinct image.
    images = {record.image for records in splits.values() for record in records}
    assert all(image.startswith("xmlab") and image.endswith("/source.jpg") for image in images)
    assert len(list((out / "images").glob("xmlab*/source.jpg"))) == len(images)
    source_test = [e for e in json.loads((shared_data / "slake" / "test.json").read_text()) if e["q_lang"] == "en"]
    assert [r.image for r in splits["test"]] == [e["img_name"] for e in source_test]


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic sources


def _write_image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)


def _vqa_rad_entry(qid, image, answer, answer_type, question="Is there a mass?"):
    return {"qid": qid, "image_name": image, "image_organ": "CHEST", "answer": answer, "answer_type": answer_type,
            "question_type": "PRES", "question": question, "phrase_type": "freeform"}


@pytest.fixture
def bad_vqa_rad(tmp_path):
    src = tmp_path / "src"
    _write_image(src / "images" / "good.jpg")
    _write_image(src / "images" / "broken.jpg", seed=1)
    data = (src / "images" / "broken.jpg").read_bytes()
    (src / "images" / "broken.jpg").write_bytes(data[: len(data) // 3])
    train = [
        _vqa_rad_entry(1, "good.jpg", "Yes", " CLOSED "),          # stray whitespace: kept, normalised
        _vqa_rad_entry(2, "good.jpg", 4, "OPEN", "How many?"),    # numeric answer: kept as "4"
        _vqa_rad_entry(3, "missing.jpg", "No", "CLOSED"),          # image not in the release
        _vqa_rad_entry(4, "good.jpg", "   ", "OPEN"),              # empty answer
        _vqa_rad_entry(5, "good.jpg", None, "OPEN"),               # no answer
        _vqa_rad_entry(6, "good.jpg", "left  lung ", "open"),      # lower-case type, doubled space
        _vqa_rad_entry(7, "good.jpg", "yes", "MAYBE"),             # unknown answer type
        _vqa_rad_entry(8, "broken.jpg", "yes", "CLOSED"),          # truncated image
        _vqa_rad_entry(9, "good.jpg", "no", "CLOSED", question=" "),  # empty question
        _vqa_rad_entry(10, "good.jpg", 2.0, "OPEN"),               # float answer that is a whole number
        _vqa_rad_entry(11, "../src/images/good.jpg", "yes", "CLOSED"),  # would escape OUT/images/
    ]
    (src / "trainset.json").write_text(json.dumps(train))
    (src / "testset.json").write_text(json.dumps([_vqa_rad_entry(11, "good.jpg", "No", "CLOSED")]))
    return src


def test_bad_inputs_are_skipped_and_counted(bad_vqa_rad, tmp_path):
    report = convert("vqa-rad", bad_vqa_rad, tmp_path / "out")
    train = _load_back(tmp_path / "out", "train")
    assert [(r.id, r.answer, r.answer_type) for r in train] == [
        ("vqa-rad-train-0", "yes", "CLOSED"), ("vqa-rad-train-1", "4", "OPEN"),
        ("vqa-rad-train-5", "left lung", "OPEN"), ("vqa-rad-train-9", "2", "OPEN")]
    assert count_skip_reasons(report.splits["train"].skipped) == {
        "empty answer": 2, "missing image": 1, "bad answer_type": 1, "unreadable image": 1, "empty question": 1,
        "bad image path": 1}
    messages = {skip.reason: skip.message for skip in report.splits["train"].skipped}
    assert "trainset.json: record 2: image" in messages["missing image"] and "missing.jpg" in messages["missing image"]
    assert "broken.jpg" in messages["unreadable image"] and "truncated" in messages["unreadable image"]
    assert "answer_type must be CLOSED or OPEN, got 'MAYBE'" in messages["bad answer_type"]
    assert [path.name for path in (tmp_path / "out" / "images").iterdir()] == ["good.jpg"]

    # Without decoding, the truncated image is not noticed (only existence is checked).
    report = convert("vqa-rad", bad_vqa_rad, tmp_path / "fast", validate_images=False)
    assert "unreadable image" not in count_skip_reasons(report.splits["train"].skipped)


def test_cli_prints_counts_and_examples(bad_vqa_rad, tmp_path, capsys):
    assert main(["vqa-rad", "--src", str(bad_vqa_rad), "--out", str(tmp_path / "out"), "--copy"]) == 0
    printed = capsys.readouterr().out
    assert "train.json: 4 records written; skipped 7 (empty answer: 2," in printed
    assert "record 2: image" in printed
    assert "copies" in printed
    # --copy really copies: the output image is not the source file.
    assert not os.path.samefile(bad_vqa_rad / "images" / "good.jpg", tmp_path / "out" / "images" / "good.jpg")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["slake", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: source folder not found"
    (tmp_path / "empty").mkdir()
    assert main(["vqa-rad", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "images: not found; a VQA-RAD source folder holds trainset.json, testset.json and images/" in err
    assert err.count("\n") == 1


def test_rerun_overwrites_in_place(bad_vqa_rad, tmp_path):
    out = tmp_path / "out"
    convert("vqa-rad", bad_vqa_rad, out)
    first = (out / "train.json").read_bytes()
    convert("vqa-rad", bad_vqa_rad, out)
    assert (out / "train.json").read_bytes() == first
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _pathvqa_tree(root, *, val_as_json=False):
    qas = {
        "train": [{"image": "train_0001", "question": "What is present?", "answer": "granuloma"},
                  {"image": "train_0001", "question": "Is granuloma present?", "answer": "Yes "},
                  {"image": "train_0002", "question": "How many nuclei?", "answer": 3},
                  {"image": "train_0404", "question": "What is this?", "answer": "edema"},   # image missing
                  {"image": "train_0002", "question": "What is shown?", "answer": ""}],      # empty answer
        "val": [{"image": "val_0001", "question": "Is this kidney?", "answer": "no"}],
        "test": [{"image": "test_0001.png", "question": "Where is this from?", "answer": "liver"},
                 {"image": "test_0002", "question": "Is this liver?", "answer": "yes"}],
    }
    for index, name in enumerate(["train/train_0001.jpg", "train/train_0002.jpg", "val/val_0001.jpg",
                                  "test/test_0001.png", "test/test_0002.png"]):
        _write_image(root / "images" / name, seed=index)
    for split, entries in qas.items():
        folder = root / "qas" / split
        folder.mkdir(parents=True)
        if split == "val" and val_as_json:
            (folder / "val_qa.json").write_text(json.dumps(entries))
        else:
            (folder / f"{split}_qa.pkl").write_bytes(pickle.dumps(entries))
    return root


@pytest.mark.parametrize("val_as_json", [False, True])
def test_pathvqa_synthetic_release(tmp_path, val_as_json):
    _pathvqa_tree(tmp_path / "release" / "pvqa", val_as_json=val_as_json)
    out = tmp_path / "out"
    report = convert("pathvqa", tmp_path / "release", out)  # the parent of pvqa/ is accepted too
    train, validate, test = (_load_back(out, split) for split in ("train", "validate", "test"))
    assert [(r.id, r.image, r.answer, r.answer_type) for r in train] == [
        ("pathvqa-train-0", "train/train_0001.jpg", "granuloma", "OPEN"),
        ("pathvqa-train-1", "train/train_0001.jpg", "yes", "CLOSED"),
        ("pathvqa-train-2", "train/train_0002.jpg", "3", "OPEN")]
    assert count_skip_reasons(report.splits["train"].skipped) == {"missing image": 1, "empty answer": 1}
    assert [(r.image, r.answer_type) for r in validate] == [("val/val_0001.jpg", "CLOSED")]
    assert [(r.image, r.answer, r.answer_type) for r in test] == [
        ("test/test_0001.png", "liver", "OPEN"), ("test/test_0002.png", "yes", "CLOSED")]
    assert sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.*")) == [
        "test/test_0001.png", "test/test_0002.png", "train/train_0001.jpg", "train/train_0002.jpg",
        "val/val_0001.jpg"]


def test_pathvqa_refuses_pickles_with_classes_and_missing_splits(tmp_path):
    root = _pathvqa_tree(tmp_path / "pvqa")
    (root / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps([OrderedDict(image="test_0002")]))
    with pytest.raises(DataFormatError, match=r"test_qa\.pkl: cannot read the PathVQA pickle .*refusing to load "
                                              r"collections\.OrderedDict"):
        convert("pathvqa", root, tmp_path / "out")
    (root / "qas" / "test" / "test_qa.pkl").unlink()
    with pytest.raises(DataFormatError, match=r"test_qa\.pkl: not found \(nor test_qa\.json\)"):
        convert("pathvqa", root, tmp_path / "out")


def test_normalize_answer():
    assert [normalize_answer(v) for v in (" Yes", "NO ", 12, 0.5, 3.0, "Right  upper\tlobe", "CT")] == \
        ["yes", "no", "12", "0.5", "3", "Right upper lobe", "CT"]
    for bad in (None, "", "  ", True, ["a"]):
        with pytest.raises(ValueError):
            normalize_answer(bad)
