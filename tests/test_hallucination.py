"""Report hallucination scores (CHAIR_s-like share, hallucinated share of stated findings, coverage) against counts
worked out by hand, and their place in the Med-VQA metrics and the evaluate command."""
import json

import pytest

from hscr_fast.evaluate import main as evaluate_main
from hscr_fast.evaluation.hallucination import (
    finding_vocabulary,
    report_metrics,
    score_report,
    stated_findings,
)
from hscr_fast.evaluation.metrics import compute_metrics, metrics_to_markdown

VOCABULARY = ["right upper lobe", "right lower lobe", "left upper lobe", "left lower lobe"]


def test_stated_findings_are_whole_word_runs_after_normalisation():
    assert stated_findings("A small lesion in the Right Upper Lobe.", VOCABULARY) == {("right", "upper", "lobe")}
    # "left lower lobes" is not the word run "left lower lobe"; "upper lobe" alone names no vocabulary entry.
    assert stated_findings("Lesions in the left lower lobes and an upper lobe.", VOCABULARY) == set()
    # Each finding once, however often it is repeated.
    assert stated_findings("right upper lobe, right upper lobe; left lower lobe", VOCABULARY) == {
        ("right", "upper", "lobe"), ("left", "lower", "lobe")}
    assert stated_findings("", VOCABULARY) == set() and stated_findings(None, VOCABULARY) == set()


def test_one_report_counted_by_hand():
    report = "A small lesion in the right upper lobe. A large lesion in the left upper lobe."
    # truth: right upper + left lower -> stated 2, hallucinated 1 (left upper), covered 1 (right upper), true 2
    assert score_report(report, ["right upper lobe", "left lower lobe"], VOCABULARY) == {
        "stated": 2, "hallucinated": 1, "covered": 1, "true": 2}
    # A normal scan: anything stated is hallucinated; nothing to cover.
    assert score_report("No lesion is seen.", [], VOCABULARY) == {"stated": 0, "hallucinated": 0, "covered": 0,
                                                                  "true": 0}
    assert score_report("A lesion in the left lower lobe.", [], VOCABULARY)["hallucinated"] == 1


def test_aggregates_of_four_reports_by_hand():
    scores = [
        score_report("A small lesion in the right upper lobe.", ["right upper lobe"], VOCABULARY),  # clean
        score_report("A lesion in the left lower lobe. A lesion in the right lower lobe.", ["left lower lobe"],
                     VOCABULARY),  # 2 stated, 1 hallucinated, 1 covered
        score_report("No lesion is seen.", ["left upper lobe", "right lower lobe"], VOCABULARY),  # misses both
        score_report("A lesion in the left upper lobe.", [], VOCABULARY),  # normal scan, 1 hallucinated
    ]
    metrics = report_metrics(scores)
    assert metrics["num_reports"] == 4
    assert metrics["report_hallucination_rate"] == pytest.approx(100 * 2 / 4)  # reports 2 and 4
    assert metrics["num_stated_findings"] == 4 and metrics["num_hallucinated_findings"] == 2
    assert metrics["hallucinated_finding_share"] == pytest.approx(100 * 2 / 4)
    assert metrics["num_true_findings"] == 4
    assert metrics["finding_coverage"] == pytest.approx(100 * 2 / 4)  # right upper (1), left lower (2)
    # Nothing stated, nothing true: the shares over zero are None, not 0.
    empty = report_metrics([score_report("No lesion is seen.", [], VOCABULARY)])
    assert empty["hallucinated_finding_share"] is None and empty["finding_coverage"] is None
    assert empty["report_hallucination_rate"] == 0.0


def test_vocabulary_is_the_union_of_the_findings_fields():
    assert finding_vocabulary([["right upper lobe"], [], ["Right upper lobe", "left lower lobe"]]) == [
        "right upper lobe", "left lower lobe"]


def _rows():
    return [
        {"prediction": "yes", "answer": "yes", "answer_type": "CLOSED", "prior": "agrees"},
        {"prediction": "A lesion in the left lower lobe.", "answer": "A lesion in the right upper lobe.",
         "answer_type": "OPEN", "findings": ["right upper lobe"], "prior": "conflicts"},
        {"prediction": "A lesion in the right upper lobe.", "answer": "A lesion in the right upper lobe.",
         "answer_type": "OPEN", "findings": ["right upper lobe"], "prior": "agrees"},
        {"prediction": "No lesion is seen.", "answer": "No lesion is seen.", "answer_type": "OPEN",
         "findings": [], "prior": "conflicts"},
        {"prediction": "no", "answer": "no", "answer_type": "CLOSED", "findings": ["left lower lobe"],
         "prior": "agrees"},  # a vocabulary source: "left lower lobe" is a known finding name
    ]


def test_compute_metrics_scores_reports_in_totals_and_breakdowns():
    metrics = compute_metrics(_rows())
    # Reports: rows 2-5. Row 2 hallucinates left lower (known from row 5) and misses right upper.
    assert metrics["num_reports"] == 4
    assert metrics["report_hallucination_rate"] == pytest.approx(25.0)
    assert metrics["hallucinated_finding_share"] == pytest.approx(50.0)  # 1 of 2 stated
    assert metrics["finding_coverage"] == pytest.approx(100 / 3)  # 1 of 3 true
    conflicts = metrics["by_prior"]["conflicts"]
    assert conflicts["num_reports"] == 2 and conflicts["report_hallucination_rate"] == pytest.approx(50.0)
    assert conflicts["finding_coverage"] == pytest.approx(0.0)
    assert "num_reports" not in metrics["by_prior"].get("(missing)", {})
    text = metrics_to_markdown(metrics)
    assert "(CHAIR_s-like) | 25.00" in text and "hallucinating reports" in text
    # Data without the field: no report keys at all.
    plain = compute_metrics([{k: v for k, v in row.items() if k != "findings"} for row in _rows()])
    assert "num_reports" not in plain and "report_hallucination_rate" not in plain


def test_malformed_findings_name_the_record():
    rows = _rows()
    rows[2]["findings"] = "right upper lobe"
    with pytest.raises(ValueError, match=r"record 2: 'findings' must be a list"):
        compute_metrics(rows)


def test_evaluate_reports_hallucination_when_the_data_has_findings(tmp_path, capsys):
    data = []
    for index, row in enumerate(_rows()):
        record = {"id": f"q{index}", "image": "x.png", "answer_type": row["answer_type"], "prior": row["prior"],
                  "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                    {"from": "gpt", "value": row["answer"]}]}
        if "findings" in row:
            record["findings"] = row["findings"]
        data.append(record)
    (tmp_path / "data.json").write_text(json.dumps(data))
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps({"question_id": f"q{i}", "text": row["prediction"]})
                                                    + "\n" for i, row in enumerate(_rows())))
    assert evaluate_main(["--predictions", str(tmp_path / "answers.jsonl"), "--data", str(tmp_path / "data.json"),
                          "--out", str(tmp_path / "out")]) == 0
    assert "reports: 25.00% with a hallucinated finding" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["finding_coverage"] == pytest.approx(100 / 3)
