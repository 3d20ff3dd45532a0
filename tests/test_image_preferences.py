"""`python -m hscr_fast.preferences.image_preferences` end to end: phantom and SLAKE records, the corrupted images they
point at
(changed exactly inside the lesion mask, reproducible from the recorded seed), skips with reasons, byte-identical
resume, and argument errors."""
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from hscr_fast.data.images import load_image
from hscr_fast.data.records import load_preference_jsonl
from hscr_fast.demo.phantom import build_phantom_dataset
from hscr_fast.models.dropout import sample_seed
from hscr_fast.preferences.corruption import corrupt_region, slake_lesion_region
from hscr_fast.preferences.image_preferences import KIND, main


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """4 images × 2 questions; with seed 2 the images hold 1, 1, 0 and 2 lesions."""
    paths = build_phantom_dataset(tmp_path_factory.mktemp("phantom") / "world", num_train_images=4, num_test_images=0,
                                  questions_per_image=2, seed=2)
    records = json.loads(paths.train_json.read_text())
    assert [len(r["lesions"]) for r in records[::2]] == [1, 1, 0, 2]
    return paths, records


def run(*argv):
    assert main([str(arg) for arg in argv]) == 0


def refused(capsys, *argv) -> str:
    """The one error line of a run that must be refused as bad input (exit 2)."""
    assert main([str(arg) for arg in argv]) == 2
    return capsys.readouterr().err


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_phantom_records_and_images(phantom, tmp_path):
    paths, records = phantom
    out = tmp_path / "prefs.jsonl"
    run("--data", paths.train_json, "--image-folder", paths.image_folder, "--out", out, "--mode", "replace",
        "--seed", 5)
    lines, skips = read_lines(out), read_lines(tmp_path / "prefs.skipped.jsonl")
    by_id = {r["id"]: r for r in records}
    assert [line["id"] for line in lines] == [r["id"] for r in records if r["lesions"]]
    assert [(s["id"], s["reason"]) for s in skips] == [(r["id"], "no_lesion") for r in records if not r["lesions"]]

    corrupted_of = {}
    for line in lines:
        record = by_id[line["id"]]
        answer = record["conversations"][1]["value"]
        assert line["kind"] == KIND and line["responses"] == [answer, answer]
        assert line["image"] == record["image"] and line["response_images"][0] == record["image"]
        assert line["prompt"] == record["conversations"][0]["value"].replace("<image>", "").strip()
        corruption = line["corruption"]
        assert corruption["mode"] == "replace" and corruption["global_seed"] == 5
        assert corruption["seed"] == sample_seed(5, record["image"])
        corrupted_path = tmp_path / "prefs.images" / line["response_images"][1]
        assert line["response_images"][1] == str(corrupted_path)  # outside the image folder: absolute
        corrupted_of.setdefault(record["image"], set()).add(line["response_images"][1])

        clean = load_image(paths.image_folder / record["image"])
        lesion = np.asarray(Image.open(paths.mask_folder / record["mask"])) > 0
        written = np.asarray(Image.open(corrupted_path))
        assert corruption["region_pixels"] == lesion.sum() and corruption["region_source"] == "mask"
        np.testing.assert_array_equal(written[~lesion], np.asarray(clean)[~lesion])
        assert (written[lesion] != np.asarray(clean)[lesion]).any(axis=1).mean() > 0.9
        expected = corrupt_region(clean, lesion, mode="replace", seed=corruption["seed"])
        np.testing.assert_array_equal(written, np.asarray(expected))
    assert all(len(names) == 1 for names in corrupted_of.values())  # one corrupted copy per image
    assert len(list((tmp_path / "prefs.images").iterdir())) == 3

    summary = json.loads((tmp_path / "prefs.summary.json").read_text())
    assert summary["written"] == 6 and summary["skipped"] == {"no_lesion": 2}
    assert summary["images_corrupted_this_run"] == 3 and summary["args"]["source"] == "phantom"
    preferences, _ = load_preference_jsonl(out, paths.image_folder)
    assert preferences[0].metadata["response_images"] == lines[0]["response_images"]


def test_add_mode_inside_the_image_folder_gives_relative_paths(phantom, tmp_path):
    paths, _ = phantom
    world = tmp_path / "world"
    shutil.copytree(paths.root, world)
    out = tmp_path / "prefs.jsonl"
    run("--data", world / "train.json", "--image-folder", world / "images", "--out", out, "--out-images",
        world / "images" / "noised", "--mode", "add", "--sigma", 30, "--num-samples", 2)
    line = read_lines(out)[0]
    assert line["response_images"][1].startswith("noised/") and line["corruption"]["sigma"] == 30.0
    assert line["corruption"]["fill_mean"] is None
    assert (world / "images" / line["response_images"][1]).is_file()


def test_resume_is_byte_identical_and_refuses_other_arguments(phantom, tmp_path, capsys):
    paths, _ = phantom
    common = ["--data", paths.train_json, "--image-folder", paths.image_folder, "--seed", 1]
    whole = tmp_path / "whole" / "prefs.jsonl"
    run(*common, "--out", whole)
    resumed = tmp_path / "resumed" / "prefs.jsonl"
    run(*common, "--out", resumed, "--num-samples", 3)
    text = resumed.read_bytes()
    resumed.write_bytes(text + b'{"id": "phantom-train-0000')  # a torn last line, as a killed run leaves
    run(*common, "--out", resumed)
    for name in ("prefs.jsonl", "prefs.skipped.jsonl"):  # equal up to the folder name in the image paths
        resumed_text = (tmp_path / "resumed" / name).read_text().replace(str(tmp_path / "resumed"), "DIR")
        assert resumed_text == (tmp_path / "whole" / name).read_text().replace(str(tmp_path / "whole"), "DIR")
    for image in (tmp_path / "whole" / "prefs.images").iterdir():
        assert (tmp_path / "resumed" / "prefs.images" / image.name).read_bytes() == image.read_bytes()
    summary = json.loads((tmp_path / "resumed" / "prefs.summary.json").read_text())
    assert summary["processed_this_run"] == 5 and summary["written"] == 6
    assert re.search("different arguments", refused(capsys, *common, "--out", resumed, "--mode", "add"))


def test_missing_mask_empty_mask_and_bad_image_are_skipped(phantom, tmp_path):
    paths, records = phantom
    world = tmp_path / "world"
    shutil.copytree(paths.root, world)
    with_lesions = [r for r in records[::2] if r["lesions"]]
    (world / "masks" / with_lesions[0]["mask"]).unlink()
    Image.fromarray(np.zeros((84, 84), dtype=np.uint8)).save(world / "masks" / with_lesions[1]["mask"])
    (world / "images" / with_lesions[2]["image"]).write_bytes(b"not a png")
    out = tmp_path / "prefs.jsonl"
    run("--data", world / "train.json", "--image-folder", world / "images", "--out", out)
    reasons = {s["id"]: (s["reason"], s["message"]) for s in read_lines(tmp_path / "prefs.skipped.jsonl")}
    first, second, third = (r["id"] for r in with_lesions)
    assert reasons[first][0] == "missing_mask" and with_lesions[0]["mask"] in reasons[first][1]
    assert reasons[second][0] == "empty_region"
    assert reasons[third][0] == "unreadable_image" and with_lesions[2]["image"] in reasons[third][1]
    assert not out.read_text()
    summary = json.loads((tmp_path / "prefs.summary.json").read_text())
    assert summary["skipped"] == {"missing_mask": 2, "empty_region": 2, "no_lesion": 2, "unreadable_image": 2}


def test_slake_end_to_end(shared_data, tmp_path):
    imgs = shared_data / "slake" / "imgs"
    entries = [{"id": f"s{n}", "image": f"{folder}/source.jpg", "answer_type": "CLOSED",
                "conversations": [{"from": "human", "value": "<image>\nIs there a lesion?"},
                                  {"from": "gpt", "value": "Yes"}]}
               for n, folder in enumerate(["xmlab102", "xmlab13", "xmlab147", "xmlab102"])]
    entries[3]["conversations"][0]["value"] = "<image>\nWhere is the lesion?"
    data = tmp_path / "slake.json"
    data.write_text(json.dumps(entries))
    out = tmp_path / "prefs.jsonl"
    run("--data", data, "--image-folder", imgs, "--out", out, "--source", "slake", "--mode", "replace")
    lines = {line["id"]: line for line in read_lines(out)}
    assert sorted(lines) == ["s0", "s2", "s3"]
    assert [s["reason"] for s in read_lines(tmp_path / "prefs.skipped.jsonl")] == ["no_lesion"]
    assert lines["s0"]["response_images"][1] == lines["s3"]["response_images"][1]
    assert lines["s0"]["corruption"]["region_source"] == "mask.png"
    assert lines["s0"]["corruption"]["region_labels"] == ["Lung Cancer"]
    assert lines["s2"]["corruption"]["region_source"] == "detection.json"
    assert lines["s0"]["answer_type"] == "CLOSED"

    region = slake_lesion_region(imgs / "xmlab147").mask
    clean = np.asarray(load_image(imgs / "xmlab147" / "source.jpg"))
    written = np.asarray(Image.open(lines["s2"]["response_images"][1]))
    np.testing.assert_array_equal(written[~region], clean[~region])
    assert lines["s2"]["corruption"]["region_pixels"] == region.sum()
    summary = json.loads((tmp_path / "prefs.summary.json").read_text())
    assert summary["region_notes_total"] == 1 and "xmlab147" in summary["region_notes"][0]

    labelled = tmp_path / "liver.jsonl"
    run("--data", data, "--image-folder", imgs, "--out", labelled, "--source", "slake", "--labels", "Liver",
        "--num-samples", 2)
    assert [line["id"] for line in read_lines(labelled)] == ["s1"]  # xmlab102 has no liver annotated


@pytest.mark.parametrize("extra,message", [
    (["--mode", "add", "--fill-mean", "3"], "--fill-mean applies to --mode replace only"),
    (["--labels", "Liver"], "--labels applies to --source slake only"),
    (["--num-samples", "-1"], "--num-samples must be >= 0"),
    (["--sigma", "-2"], "--sigma must be a finite number >= 0"),
])
def test_bad_arguments(phantom, tmp_path, extra, message, capsys):
    paths, _ = phantom
    assert re.search(message, refused(capsys, "--data", paths.train_json, "--image-folder", paths.image_folder,
                                      "--out", tmp_path / "p.jsonl", *extra))


def test_missing_data_file(tmp_path, capsys):
    assert re.search("nope.json: file not found",
                     refused(capsys, "--data", tmp_path / "nope.json", "--out", tmp_path / "p.jsonl"))


def test_phantom_records_without_mask_use_lesion_boxes(phantom, tmp_path):
    paths, records = phantom
    unmasked = [{key: value for key, value in record.items() if key != "mask"} for record in records]
    data = tmp_path / "boxes.json"
    data.write_text(json.dumps(unmasked))
    out = tmp_path / "prefs.jsonl"
    run("--data", data, "--image-folder", paths.image_folder, "--out", out, "--margin", 1)
    line = read_lines(out)[-1]  # the image with two lesions
    record = next(r for r in records if r["id"] == line["id"])
    expected = np.zeros((84, 84), dtype=bool)
    for lesion in record["lesions"]:
        x, y, w, h = lesion["bbox"]
        expected[y - 1:y + h + 1, x - 1:x + w + 1] = True
    assert line["corruption"]["region_source"] == "lesions.bbox"
    assert line["corruption"]["region_pixels"] == expected.sum()
    written = np.asarray(Image.open(line["response_images"][1]))
    clean = np.asarray(load_image(paths.image_folder / record["image"]))
    np.testing.assert_array_equal(written[~expected], clean[~expected])
