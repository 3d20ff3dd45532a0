"""The phantom Med-VQA generator: answers must follow from the rendered pixels, deterministically; the clinical
history must name the true locations exactly as often as each split says and name other ones otherwise; and the
dataset files must be valid LLaVA-Med JSON written atomically and idempotently."""
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hscr_fast.demo import phantom
from hscr_fast.demo.phantom import (
    DEFAULT_IMAGE_SIZE,
    FISSURE_BAND,
    HISTORY_AGREEMENT,
    LESION_IRREGULARITY,
    LESION_RADIUS,
    Lesion,
    build_phantom_dataset,
    candidate_questions,
    draw_history,
    image_rngs,
    phantom_corpus,
    phantom_vocabulary,
    questions_for,
    render_phantom,
)


def render(seed: int, index: int, image_size: int = DEFAULT_IMAGE_SIZE):
    return render_phantom(image_rngs(seed, "train", index)[0], image_size)


def findings_from_mask(mask: np.ndarray) -> list[tuple[str, str, str]]:
    """Side, lobe and size of each lesion recomputed from mask pixels alone, in mask-index order.

    Side: all pixels left of the image midline → the patient's right (radiological convention). Lobe: all pixels above
    the fissure band → upper. Size: area against the geometric mean of the largest possible small area and the smallest
    possible large area.
    """
    size = mask.shape[0]
    small_max = np.pi * (LESION_RADIUS["small"][1] * size * (1 + LESION_IRREGULARITY["small"])) ** 2
    large_min = np.pi * (LESION_RADIUS["large"][0] * size) ** 2  # harmonic wobble only adds area
    threshold = np.sqrt(small_max * large_min)
    findings = []
    for index in range(1, int(mask.max()) + 1):
        rows, cols = np.nonzero(mask == index)
        assert rows.size, f"mask index {index} has no pixels"
        if cols.max() < size / 2:
            side = "right"
        else:
            assert cols.min() >= size / 2, "lesion straddles the midline"
            side = "left"
        if rows.max() < FISSURE_BAND[0] * size:
            lobe = "upper"
        else:
            assert rows.min() > FISSURE_BAND[1] * size, "lesion touches the fissure band"
            lobe = "lower"
        findings.append((side, lobe, "small" if rows.size < threshold else "large"))
    return findings


WORD = r"(right|left|upper|lower|small|large)"


def oracle(question: str, findings: list[tuple[str, str, str]]) -> str:
    """An answer key written from the question's words, independently of the generator's templates."""
    n = len(findings)
    sides = {f[0] for f in findings}
    lobes = {(f[0], f[1]): f[2] for f in findings}
    yes_no = lambda flag: "yes" if flag else "no"  # noqa: E731
    q = question.rstrip("?.")
    if q.startswith(("How many", "What is the number")):
        return str(n)
    if q.startswith(("Describe", "What does this scan", "Summarize")):
        if n == 0:
            return "No lesion is seen."
        return " ".join(f"A {size} lesion in the {side} {lobe} lobe." for side, lobe, size in findings)
    if q.startswith(("Where", "What is the location", "What are the locations")):
        return " and ".join(f"{side} {lobe} lobe" for side, lobe, _ in findings)
    if q.startswith("Which"):
        return "both lungs" if len(sides) == 2 else f"{sides.pop()} lung"
    located = re.search(rf"{WORD} {WORD} lobe", q) or re.search(rf"{WORD} lobe of the {WORD} lung", q)
    if located:
        side, lobe = located.groups() if "lobe of" not in q else located.groups()[::-1]
        if q.startswith(("What size", "How big")):
            return lobes[(side, lobe)]
        asked_size = re.search(r"lobe (small|large)$", q)
        if asked_size:
            return yes_no(lobes[(side, lobe)] == asked_size.group(1))
        return yes_no((side, lobe) in lobes)
    if q.startswith(("What size", "How big", "What is the size")):
        return findings[0][2]
    if m := re.search(r"(right|left) (lung|side)", q):
        if "lung clear" in q:
            return yes_no(m.group(1) not in sides)
        if q.startswith("Is the lesion"):
            return yes_no(findings[0][0] == m.group(1))
        return yes_no(m.group(1) in sides)
    if m := re.match(r"Is the lesion in the (upper|lower) lobe", q):
        return yes_no(findings[0][1] == m.group(1))
    if m := re.search(r"(small|large)", q):
        if q.startswith("Is there"):
            return yes_no(m.group(1) in {f[2] for f in findings})
        return yes_no(findings[0][2] == m.group(1))
    for phrase, holds in (("more than one", n > 1), ("no lesions", n == 0), ("one lesion", n == 1),
                          ("two lesions", n == 2), ("normal", n == 0), ("both lungs clear", n == 0),
                          ("free of lesions", n == 0)):
        if phrase in q:
            return yes_no(holds)
    assert q.startswith(("Is there a lesion", "Is a lesion", "Are there any", "Is any lesion")), question
    return yes_no(n > 0)


def test_same_seed_same_pixels_other_seed_other_pixels():
    image_a, mask_a, lesions_a = render(7, 3)
    image_b, mask_b, lesions_b = render(7, 3)
    assert image_a.dtype == np.uint8 and image_a.shape == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3)
    assert (image_a == image_b).all() and (mask_a == mask_b).all() and lesions_a == lesions_b
    assert (image_a[..., 0] == image_a[..., 1]).all(), "grey scan stored as RGB"
    assert not (render(8, 3)[0] == image_a).all()
    assert not (render(7, 4)[0] == image_a).all()
    questions = [questions_for(lesions_a, image_rngs(7, "train", 3)[1], 6) for _ in range(2)]
    assert questions[0] == questions[1]


def test_every_answer_agrees_with_the_mask_pixels():
    asked = Counter()
    for index in range(300):
        image_size = (84, 112, 56)[index % 3]  # other sizes scale the geometry, the semantics must hold
        _, mask, lesions = render(1, index, image_size)
        from_mask = findings_from_mask(mask)
        assert from_mask == [(lesion.side, lesion.lobe, lesion.size) for lesion in lesions], f"image {index}"
        for qa in candidate_questions(from_mask):
            assert qa.answer == oracle(qa.question, from_mask), (index, qa, from_mask)
            assert qa.answer_type == ("CLOSED" if qa.answer in ("yes", "no") else "OPEN")
        drawn = questions_for(lesions, image_rngs(1, "train", index)[1], 8)
        assert len({qa.question for qa in drawn}) == 8
        for qa in drawn:
            assert qa.answer == oracle(qa.question, from_mask)
            asked[qa.question_type] += 1
    assert set(asked) == {"presence", "location", "count", "size", "description"}


def test_closed_answers_are_balanced():
    answers, answers_by_type, answer_types = Counter(), {}, Counter()
    for index in range(1500):
        lesions = render(2, index)[2]
        for qa in questions_for(lesions, image_rngs(2, "train", index)[1], 4):
            answer_types[qa.answer_type] += 1
            if qa.answer_type == "CLOSED":
                answers[qa.answer] += 1
                answers_by_type.setdefault(qa.question_type, Counter())[qa.answer] += 1
    assert 0.46 <= answers["yes"] / sum(answers.values()) <= 0.54, answers
    for question_type, counts in answers_by_type.items():
        assert 0.40 <= counts["yes"] / sum(counts.values()) <= 0.60, (question_type, counts)
    assert 0.40 <= answer_types["CLOSED"] / sum(answer_types.values()) <= 0.65, answer_types


def test_lesions_are_separate_visible_and_boxed_exactly():
    patch = 14
    # ≤ 13 pixels across can never touch 3 patches in a row.
    assert 2 * LESION_RADIUS["large"][1] * (1 + LESION_IRREGULARITY["large"]) * DEFAULT_IMAGE_SIZE < 13
    for index in range(400):
        image, mask, lesions = render(3, index)
        assert sorted(np.unique(mask).tolist()) == list(range(len(lesions) + 1))
        pixels = []
        for lesion in lesions:
            rows, cols = np.nonzero(mask == lesion.index)
            x, y, w, h = lesion.bbox
            assert (x, y, w, h) == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
            assert x <= lesion.center[0] <= x + w - 1 and y <= lesion.center[1] <= y + h - 1
            # Inside 1–4 ViT patches at the default size.
            assert ((x + w - 1) // patch - x // patch + 1) * ((y + h - 1) // patch - y // patch + 1) <= 4
            # Visible: much brighter than the lung ring just around it.
            ring = np.zeros_like(mask, dtype=bool)
            ring[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = True
            ring &= mask == 0
            assert image[mask == lesion.index, 0].mean() - image[ring, 0].mean() > 60, (index, lesion)
            pixels.append(np.stack([rows, cols], 1))
        if len(pixels) == 2:
            gaps = np.linalg.norm(pixels[0][:, None, :] - pixels[1][None, :, :], axis=-1)
            assert gaps.min() >= 2, f"image {index}: lesions {gaps.min():.1f} px apart"


def test_global_intensity_does_not_reveal_lesions():
    """Per-image exposure jitter must hide the few bright lesion pixels from the image mean (AUC near 0.5)."""
    means, has_lesion = [], []
    for index in range(600):
        image, _, lesions = render(4, index)
        means.append(image.mean())
        has_lesion.append(bool(lesions))
    means, has_lesion = np.array(means), np.array(has_lesion)
    auc = (means[has_lesion][:, None] > means[~has_lesion][None, :]).mean()
    assert 0.35 < auc < 0.65, auc


def test_corpus_covers_every_text_with_a_small_vocabulary():
    corpus = set(phantom_corpus())
    vocabulary = phantom_vocabulary()
    assert len(vocabulary) < 100 and "lesion" in vocabulary and "yes" in vocabulary
    for index in range(200):
        lesions = render(5, index)[2]
        for qa in questions_for(lesions, image_rngs(5, "train", index)[1], 12):
            assert qa.question in corpus and qa.answer in corpus
            assert 1 <= len(re.findall(r"\w+", qa.answer)) <= 16, qa


def test_bad_arguments_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        render_phantom(np.random.default_rng(0), 40)
    lesion = Lesion(index=1, side="right", lobe="upper", size="small", center=(0, 0), radius=1, bbox=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="distinct lobes"):
        questions_for([lesion, lesion], np.random.default_rng(0))
    with pytest.raises(ValueError, match="sides"):
        questions_for([Lesion(1, "middle", "upper", "small", (0, 0), 1, (0, 0, 1, 1))], np.random.default_rng(0))
    with pytest.raises(ValueError, match="questions_per_image"):
        build_phantom_dataset(tmp_path / "ds", num_train_images=1, num_test_images=1, questions_per_image=0)
    with pytest.raises(ValueError, match="num_val_images"):
        build_phantom_dataset(tmp_path / "ds", num_train_images=1, num_val_images=-1, num_test_images=1)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a phantom dataset"):
        build_phantom_dataset(tmp_path / "user", num_train_images=1, num_test_images=1)
    assert (tmp_path / "user" / "precious.txt").read_text() == "keep me"


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


HISTORY = re.compile(r"(?:lesions? in|nodules? in) the (right|left) (upper|lower) lobe(?: and the (right|left) "
                     r"(upper|lower) lobe)?")


def history_locations(history: str) -> list[list[str]]:
    """The locations a history line names, read back from its words (independently of the generator's templates)."""
    if "no chest complaints" in history or "no symptoms" in history:
        return []
    match = HISTORY.search(history)
    assert match, history
    words = [word for word in match.groups() if word]
    return [words[i:i + 2] for i in range(0, len(words), 2)]


def test_dataset_files_are_valid_llava_med_json(tmp_path):
    paths = build_phantom_dataset(tmp_path / "ds", num_train_images=12, num_val_images=4, num_test_images=5,
                                  questions_per_image=3, seed=11, image_size=84)
    ids = set()
    for split, json_path, num_images, asked in (("train", paths.train_json, 12, 1), ("val", paths.val_json, 4, 1),
                                                ("test", paths.test_json, 5, 2)):
        records = json.loads(json_path.read_text())
        assert len(records) == num_images * 3 * asked
        for record in records:
            report = record["question_type"] == "description"
            assert set(record) == {"id", "image", "mask", "conversations", "answer_type", "question_type", "organ",
                                   "modality", "lesions", "history_locations", "prior"} | ({"findings"} if report
                                                                                          else set())
            ids.add(record["id"])
            human, gpt = record["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\nHistory: ")
            assert gpt["from"] == "gpt" and gpt["value"]
            assert record["answer_type"] in ("CLOSED", "OPEN") and record["organ"] == "chest"
            index = int(record["image"].split("_")[1].split(".")[0])
            image, mask, lesions = render_phantom(image_rngs(11, split, index)[0], 84)
            assert (np.asarray(Image.open(paths.image_folder / record["image"]).convert("RGB")) == image).all()
            assert (np.asarray(Image.open(paths.mask_folder / record["mask"])) == mask).all()
            assert [Lesion.from_dict(d) for d in record["lesions"]] == [
                Lesion.from_dict(lesion.to_dict()) for lesion in lesions]
            history, question = human["value"].split("\n", 1)[1].split(". ", 1)
            truth = findings_from_mask(mask)
            # The answer follows from the image whatever the history says.
            assert gpt["value"] == oracle(question, truth)
            # The history names what the record says it names; "agrees" exactly when that is the truth.
            assert history_locations(history) == record["history_locations"]
            agrees = record["history_locations"] == [[side, lobe] for side, lobe, _ in truth]
            assert record["prior"] == ("agrees" if agrees else "conflicts")
            if report:
                assert record["findings"] == [f"{side} {lobe} lobe" for side, lobe, _ in truth]
    assert len(ids) == (12 + 4 + 5 * 2) * 3, "ids must be unique across splits"
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["fingerprint"]["seed"] == 11 and manifest["splits"]["train"]["records"] == 36
    assert manifest["splits"]["test"]["prior"] == {"agrees": 15, "conflicts": 15}


def test_test_halves_differ_only_in_the_history(tmp_path):
    paths = build_phantom_dataset(tmp_path / "ds", num_train_images=0, num_val_images=0, num_test_images=30,
                                  questions_per_image=4, seed=3)
    records = json.loads(paths.test_json.read_text())
    agreeing = [r for r in records if r["prior"] == "agrees"]
    conflicting = [r for r in records if r["prior"] == "conflicts"]
    assert len(agreeing) == len(conflicting) == 120
    for agree, conflict in zip(agreeing, conflicting):
        assert agree["id"].removesuffix("-agrees") == conflict["id"].removesuffix("-conflicts")
        assert agree["image"] == conflict["image"] and agree["conversations"][1] == conflict["conversations"][1]
        question = lambda r: r["conversations"][0]["value"].split(". ", 1)[1]  # noqa: E731
        assert question(agree) == question(conflict)
        assert agree["history_locations"] != conflict["history_locations"]
    # Conflicting histories cover every kind of disagreement, the headline one included: a normal scan with a
    # history of a known lesion.
    kinds = {(bool(r["lesions"]), bool(r["history_locations"])) for r in conflicting}
    assert kinds == {(False, True), (True, False), (True, True)}


def test_training_history_agrees_at_the_stated_rate():
    rng = np.random.default_rng(0)
    lesions_of = [render(8, index)[2] for index in range(60)]
    # draw_history itself: agreeing names the truth, conflicting never does.
    for lesions in lesions_of:
        truth = [[lesion.side, lesion.lobe] for lesion in lesions]
        findings = [(lesion.side, lesion.lobe, lesion.size) for lesion in lesions]
        assert draw_history(rng, findings, True)[1] == truth
        assert draw_history(rng, findings, False)[1] != truth
    # The split's rate, over the draws the dataset makes (one Bernoulli per image from its history generator).
    draws = [phantom.history_rng(0, "train", index).random() < HISTORY_AGREEMENT["train"] for index in range(4000)]
    assert abs(np.mean(draws) - 0.8) < 0.02


def test_dataset_is_deterministic_idempotent_and_atomic(tmp_path, monkeypatch):
    args = dict(num_train_images=6, num_val_images=2, num_test_images=3, questions_per_image=2, seed=5)
    first = build_phantom_dataset(tmp_path / "a", **args)
    second = build_phantom_dataset(tmp_path / "b", **args)
    assert _tree_bytes(first.root) == _tree_bytes(second.root)
    assert _tree_bytes(build_phantom_dataset(tmp_path / "c", **{**args, "seed": 6}).root) != _tree_bytes(first.root)

    # Same arguments on a complete directory: nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in first.root.rglob("*")}
    time.sleep(0.01)
    assert build_phantom_dataset(tmp_path / "a", **args) == first
    assert {p: p.stat().st_mtime_ns for p in first.root.rglob("*")} == stamps

    # Other arguments replace the old phantom dataset.
    build_phantom_dataset(tmp_path / "a", **{**args, "num_train_images": 4})
    assert len(json.loads(first.train_json.read_text())) == 4 * 2
    assert len(list(first.image_folder.iterdir())) == 4 + 2 + 3

    # A crash midway leaves the previous dataset intact and no staging directory behind.
    def crash(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(phantom, "_write_split", crash)
    before = _tree_bytes(first.root)
    with pytest.raises(RuntimeError, match="disk full"):
        build_phantom_dataset(tmp_path / "a", **args)
    assert _tree_bytes(first.root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_rendering_is_fast_enough_for_thousands_of_images():
    start = time.perf_counter()
    for index in range(500):
        render(6, index)
    # ~1–3 ms per image on a shared 2-core machine; the bound only catches per-pixel Python loops.
    assert time.perf_counter() - start < 30
