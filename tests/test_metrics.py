"""Med-VQA metrics on hand-written cases: LLaVA-Med normalisation, substring vs exact scoring, recall, aggregation."""
import json

import pytest

from hscr_fast.evaluation.metrics import compute_metrics, metrics_to_markdown, normalize_answer, score_prediction


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yes", "yes"),
        ("Yes, it is.", "yes it is"),  # punctuation next to a space is deleted
        ("No.", "no"),
        ("left-sided", "left sided"),  # punctuation inside a word becomes a space
        ("x-ray (CT)", "x ray ct"),
        ("1,000 cells", "1000 cells"),  # a digit,digit comma deletes instead of spacing
        ("2.5 cm", "2.5 cm"),  # the point of a decimal stays
        ("2.5 cm.", "2.5 cm"),  # the full stop goes
        ("The lesion is 3.", "lesion is 3"),
        ("two", "2"),
        ("Two nodules", "2 nodules"),
        ("none", "0"),
        ("zero or ten", "0 or 10"),
        ("a mass in the lung", "mass in lung"),
        ("An effusion", "effusion"),
        ("theory", "theory"),  # only whole words are articles
        ("  many   spaces\there ", "many spaces here"),
        ("Answer: no", "answer: no"),  # ':' is not in LLaVA-Med's punctuation list
        (3, "3"),
        (2.5, "2.5"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_no_versus_not_and_nodule_substring_flatters_exact_does_not():
    for prediction in ("not", "Nodule", "There is no nodule.", "normal", "unknown"):
        scores = score_prediction(prediction, "no", "CLOSED")
        assert scores["closed_hit"] == 1.0, prediction  # "no" is a substring of all of these
    assert score_prediction("not", "no", "CLOSED")["exact"] == 0.0
    assert score_prediction("Nodule", "no", "CLOSED")["exact"] == 0.0
    assert score_prediction("No.", "no", "CLOSED")["exact"] == 1.0
    assert score_prediction("Yes", "no", "CLOSED")["closed_hit"] == 0.0


def test_yes_no_variant_requires_yes_or_no_in_the_prediction():
    # "left" is in "left lung", but the prediction says neither yes nor no.
    left = score_prediction("The left lung", "left", "CLOSED")
    assert left["closed_hit"] == 1.0 and left["closed_hit_yes_no"] == 0.0
    # "no" occurs inside "nodule", so the variant is just as easily flattered.
    nodule = score_prediction("a left nodule", "left", "CLOSED")
    assert nodule["closed_hit"] == 1.0 and nodule["closed_hit_yes_no"] == 1.0
    wrong = score_prediction("Yes", "no", "CLOSED")
    assert wrong["closed_hit_yes_no"] == 0.0  # a miss counts as wrong, it is not dropped from the denominator
    assert score_prediction("yes, it is", "yes", "CLOSED")["closed_hit_yes_no"] == 1.0


def test_numbers_and_number_words_match():
    assert score_prediction("two", "2", "OPEN")["exact"] == 1.0
    assert score_prediction("There are Two.", 2, "OPEN")["recall"] == 1.0
    assert score_prediction("three", "2", "OPEN")["recall"] == 0.0
    assert score_prediction("None", "0", "CLOSED")["exact"] == 1.0


def test_decimals_keep_their_point():
    assert score_prediction("The mass is 2.5 cm.", "2.5 cm", "OPEN")["recall"] == 1.0
    # Without the decimal point rule "2.5" would become "25" or "2 5"; neither matches "2".
    assert score_prediction("2.5 cm", "2 cm", "OPEN")["recall"] == 0.5
    assert score_prediction("2.5", "2.5", "CLOSED")["exact"] == 1.0


def test_punctuation_and_articles_do_not_matter():
    assert score_prediction("Yes!", "yes", "CLOSED")["exact"] == 1.0
    assert score_prediction("The right lung.", "right lung", "OPEN")["exact"] == 1.0
    assert score_prediction("(left) kidney", "Left kidney", "OPEN")["exact"] == 1.0


def test_multi_word_open_answers_give_partial_recall():
    scores = score_prediction("The lesion is in the left upper lobe", "right upper lobe", "OPEN")
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["exact"] == 0.0
    assert score_prediction("upper lobe, right side", "right upper lobe", "OPEN")["recall"] == 1.0  # order-free
    # Repeating a matched word does not raise recall (LLaVA-Med's f1 code would count it twice: 2/3).
    assert score_prediction("left left", "left lung", "OPEN")["recall"] == 0.5
    # Recall matches words, not substrings: "lung" is not in "lungs".
    assert score_prediction("both lungs", "lung", "OPEN")["recall"] == 0.0


@pytest.mark.parametrize("prediction", ["", "   ", None, "...", "the"])
def test_empty_predictions_score_zero(prediction):
    closed = score_prediction(prediction, "no", "CLOSED")
    assert closed["closed_hit"] == closed["closed_hit_yes_no"] == closed["exact"] == 0.0
    opened = score_prediction(prediction, "left lung", "OPEN")
    assert opened["recall"] == opened["exact"] == 0.0


def test_answer_type_is_normalised_and_checked():
    assert score_prediction("yes", "yes", " closed ")["answer_type"] == "CLOSED"
    assert score_prediction("yes", "yes", "Open\n")["answer_type"] == "OPEN"
    with pytest.raises(ValueError, match="'yes/no'"):
        score_prediction("yes", "yes", "yes/no")
    with pytest.raises(ValueError, match="None"):
        score_prediction("yes", "yes", None)
    with pytest.raises(ValueError, match="empty after normalisation"):
        score_prediction("yes", "The", "OPEN")


def test_compute_metrics_aggregates_in_percent_with_breakdowns():
    records = [
        {"prediction": "Yes", "answer": "yes", "answer_type": "CLOSED", "organ": "CHEST", "modality": "X-Ray"},
        {"prediction": "not sure", "answer": "no", "answer_type": "CLOSED", "organ": "CHEST", "modality": "X-Ray"},
        {"prediction": "", "answer": "Yes", "answer_type": "CLOSED ", "organ": "HEAD", "modality": "CT"},
        {"prediction": "left upper lobe", "answer": "right upper lobe", "answer_type": "OPEN", "organ": "CHEST"},
        {"prediction": "Two", "answer": "2", "answer_type": "open", "organ": "HEAD", "modality": "CT"},
    ]
    metrics = compute_metrics(records)
    assert metrics["num_closed"] == 3 and metrics["num_open"] == 2 and metrics["num_questions"] == 5
    assert metrics["closed_accuracy"] == pytest.approx(200 / 3)  # "no" in "not sure" flatters
    assert metrics["closed_accuracy_yes_no"] == pytest.approx(200 / 3)
    assert metrics["closed_exact"] == pytest.approx(100 / 3)
    assert metrics["open_recall"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert metrics["open_exact"] == pytest.approx(50.0)
    assert "by_question_type" not in metrics

    chest, head = metrics["by_organ"]["CHEST"], metrics["by_organ"]["HEAD"]
    assert (chest["num_closed"], chest["num_open"]) == (2, 1)
    assert chest["closed_accuracy"] == 100.0 and chest["closed_exact"] == 50.0
    assert chest["open_recall"] == pytest.approx(200 / 3)
    assert head["closed_accuracy"] == 0.0 and head["open_exact"] == 100.0
    assert set(metrics["by_modality"]) == {"X-Ray", "CT", "(missing)"}
    assert metrics["by_modality"]["(missing)"]["closed_accuracy"] is None  # no closed question in that group
    json.dumps(metrics)  # metrics.json must be writable as is


def test_compute_metrics_with_only_one_type_and_errors_name_the_record():
    only_closed = compute_metrics([{"prediction": "yes", "answer": "yes", "answer_type": "CLOSED"}])
    assert only_closed["open_recall"] is None and only_closed["closed_accuracy"] == 100.0
    with pytest.raises(ValueError, match=r"record 1 \(id 'q7'\).*got 'multi'"):
        compute_metrics([{"prediction": "yes", "answer": "yes", "answer_type": "CLOSED"},
                         {"id": "q7", "prediction": "yes", "answer": "yes", "answer_type": "multi"}])
    with pytest.raises(ValueError, match=r"record 0.*\['prediction'\]"):
        compute_metrics([{"text": "yes", "answer": "yes", "answer_type": "CLOSED"}])


def test_markdown_report_holds_the_numbers():
    metrics = compute_metrics([
        {"prediction": "yes", "answer": "yes", "answer_type": "CLOSED", "question_type": "PRES"},
        {"prediction": "no", "answer": "yes", "answer_type": "CLOSED", "question_type": "SIZE|POS"},
    ])
    report = metrics_to_markdown(metrics, title="phantom test set")
    assert report.startswith("## phantom test set")
    assert "| closed accuracy (substring, LLaVA-Med) | 50.00 |" in report
    assert "| open recall (LLaVA-Med) | – |" in report
    assert "### by question type" in report
    assert "| PRES | 1 | 100.00 | 100.00 | 100.00 | 0 | – | – |" in report
    assert "| SIZE\\|POS | 1 | 0.00 |" in report


def load_real_test_sets(shared_data):
    """VQA-RAD test and SLAKE English test as metric records (answer as prediction filled in by the caller)."""
    vqa_rad = json.loads((shared_data / "vqa-rad" / "testset.json").read_text())
    slake = [r for r in json.loads((shared_data / "slake" / "test.json").read_text()) if r["q_lang"] == "en"]
    return {
        "vqa-rad": [{"id": r["qid"], "answer": r["answer"], "answer_type": r["answer_type"],
                     "organ": r["image_organ"], "question_type": r["question_type"]} for r in vqa_rad],
        "slake": [{"id": r["qid"], "answer": r["answer"], "answer_type": r["answer_type"], "organ": r["location"],
                   "modality": r["modality"], "question_type": r["content_type"]} for r in slake],
    }


@pytest.mark.shared_data
def test_real_test_sets_score_end_to_end(shared_data):
    for name, records in load_real_test_sets(shared_data).items():
        # The ground truth as its own prediction is perfect on every metric (mixed case, stray spaces, numbers).
        perfect = compute_metrics([{**r, "prediction": r["answer"]} for r in records])
        assert perfect["num_closed"] + perfect["num_open"] == len(records), name
        for metric in ("closed_accuracy", "closed_exact", "open_recall", "open_exact"):
            assert perfect[metric] == 100.0, (name, metric)
        # The yes/no variant only credits closed answers that contain "yes" or "no" ("left" vs "right" ones fail).
        closed = [r for r in records if r["answer_type"].strip() == "CLOSED"]
        says_yes_or_no = [any(w in normalize_answer(r["answer"]) for w in ("yes", "no")) for r in closed]
        yes_no_share = 100 * sum(says_yes_or_no) / len(closed)
        assert perfect["closed_accuracy_yes_no"] == pytest.approx(yes_no_share) and yes_no_share > 75, name
        # Always answering "yes": closed accuracy is the share of "yes" answers plus what substring matching adds.
        always_yes = compute_metrics([{**r, "prediction": "Yes"} for r in records])
        yes_share = 100 * sum(normalize_answer(r["answer"]) == "yes" for r in closed) / len(closed)
        assert always_yes["closed_exact"] == pytest.approx(yes_share), name
        assert 20 < always_yes["closed_accuracy"] < 80, name
        assert len(always_yes["by_organ"]) > 1 and "by_question_type" in always_yes
