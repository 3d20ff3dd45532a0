"""Med-VQA scores as LLaVA-Med's published evaluation computes them, plus strict exact match.

The HSCR paper's Table 1 (like most Med-VQA tables since LLaVA-Med) comes from LLaVA-Med's `llava/eval/run_eval.py`
and `eval_metrics/glossary.py`. That code is reproduced here, with its quirks named:

Normalisation (`normalize_answer`, LLaVA-Med's `normalize_word`, itself the official VQA v2 evaluation's punctuation,
digit and article processing):
  1. lower-case;
  2. the marks  ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !  are deleted when one of them stands next to a space
     anywhere in the text (or the text has a digit,digit comma such as "1,000"), and become spaces otherwise, so
     "yes, it is" → "yes it is", "left-sided" → "left sided", "1,000" → "1000". Other characters (: ' % * # & ...)
     are kept, as in the original;
  3. a point is removed unless a digit follows it: "2.5 cm." → "2.5 cm";
  4. split on whitespace; "none", "zero" … "ten" become "0" … "10"; the articles a, an, the are dropped.
  Two deliberate differences: LLaVA-Med maps apostrophe-less contractions ("dont" → "don't") — omitted, it never
  decides a medical answer; and its period regex removes at most 32 points per text (re.UNICODE passed as the `count`
  argument) — here all are removed.

Scores per question (`score_prediction`), on the normalised strings:
  CLOSED  closed_accuracy          the ground truth occurs as a *substring* of the prediction (LLaVA-Med's
                                   "yes/no accuracy"). Substring scoring flatters: "no" occurs in "not", "nodule",
                                   "normal", "unknown", so a verbose wrong answer can count as correct.
          closed_accuracy_yes_no   the same, but only when the prediction also contains "yes" or "no" (as substrings;
                                   the earlier LLaVA-Med run_eval.py variant). That script silently dropped the misses
                                   of this variant from the denominator; here they count as wrong.
  OPEN    open_recall              the fraction of ground-truth words that occur among the prediction's words
                                   (LLaVA-Med paper: "the ratio of ground-truth tokens that appear in the generated
                                   sequences"). LLaVA-Med's calculate_f1score counts repeated prediction words again
                                   ("left left" against "left lung" scores 2/3 there, 1/2 here).
  both    closed_exact/open_exact  strict: normalised prediction == normalised ground truth.
An empty prediction scores 0 everywhere. Aggregates are percentages (as the papers print them); a metric over zero
questions is None.

Reports: records that carry a `findings` list (the image's true findings, see `hscr_fast.evaluation.hallucination`) are
also
scored as generated reports — report hallucination rate (CHAIR_s-like), hallucinated share of stated findings and
coverage of true findings — over the records that have the field, in the totals and in every breakdown group.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable

__all__ = [
    "ANSWER_TYPES",
    "BREAKDOWN_KEYS",
    "compute_metrics",
    "metrics_to_markdown",
    "normalize_answer",
    "normalize_answer_type",
    "score_prediction",
]

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# LLaVA-Med writes "(?!<=\d)(\.)(?!\d)": the first group is a mistyped lookbehind that never matches "<=digit" text in
# answers, so the pattern behaves as "a point not followed by a digit".
_POINT_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}

ANSWER_TYPES = ("CLOSED", "OPEN")
# Record keys that get their own breakdown table when the data has them.
# SLAKE names the body region "location" (Abdomen, Lung, ...); VQA-RAD names it "organ".
# The phantom demo world names whether a question's clinical history agrees with the image as "prior".
BREAKDOWN_KEYS = ("organ", "location", "modality", "question_type", "prior")


def normalize_answer(text: Any) -> str:
    """LLaVA-Med's answer normalisation (see the module docstring); None → ""; numbers are formatted with str()."""
    if text is None:
        return ""
    text = str(text).lower()
    delete_marks = _DIGIT_COMMA_DIGIT.search(text) is not None
    cleaned = text
    for mark in _PUNCTUATION:
        # The test looks at the original text, not the partly cleaned one, exactly as the reference does.
        if delete_marks or mark + " " in text or " " + mark in text:
            cleaned = cleaned.replace(mark, "")
        else:
            cleaned = cleaned.replace(mark, " ")
    cleaned = _POINT_NOT_BEFORE_DIGIT.sub("", cleaned)
    words = (_NUMBER_WORDS.get(word, word) for word in cleaned.split())
    return " ".join(word for word in words if word not in _ARTICLES)


def normalize_answer_type(answer_type: Any) -> str:
    """' closed ' → 'CLOSED'; anything but CLOSED/OPEN is an error naming the value."""
    normalized = str(answer_type).strip().upper() if answer_type is not None else ""
    if normalized not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be CLOSED or OPEN (any case, surrounding spaces allowed), got "
                         f"{answer_type!r}")
    return normalized


def score_prediction(prediction: Any, answer: Any, answer_type: Any) -> dict[str, Any]:
    """Scores of one prediction, each in [0, 1].

    Returns {"answer_type", "prediction_normalized", "answer_normalized", "exact"} plus "closed_hit" and
    "closed_hit_yes_no" for CLOSED, or "recall" for OPEN. Raises ValueError when the ground truth normalises to an
    empty string (nothing to match: the substring test would call every prediction correct).
    """
    kind = normalize_answer_type(answer_type)
    predicted = normalize_answer(prediction)
    truth = normalize_answer(answer)
    if not truth:
        raise ValueError(f"ground-truth answer {answer!r} is empty after normalisation; fix or drop this question")
    scores: dict[str, Any] = {
        "answer_type": kind,
        "prediction_normalized": predicted,
        "answer_normalized": truth,
        "exact": float(predicted == truth),
    }
    if kind == "CLOSED":
        hit = truth in predicted
        scores["closed_hit"] = float(hit)
        scores["closed_hit_yes_no"] = float(hit and ("yes" in predicted or "no" in predicted))
    else:
        predicted_words = set(predicted.split())
        truth_words = truth.split()
        scores["recall"] = sum(word in predicted_words for word in truth_words) / len(truth_words)
    return scores


def compute_metrics(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate Med-VQA metrics over records {"prediction", "answer", "answer_type", optional organ/modality/...}.

    "prediction" must be present (None or "" is an empty prediction and scores 0).

    Returns closed_accuracy, closed_accuracy_yes_no, closed_exact, open_recall, open_exact (percent, None over zero
    questions), num_closed, num_open, num_questions, and for each of BREAKDOWN_KEYS present in any record a
    "by_<key>" dict mapping each value to the same metrics over its questions (records without the key go under
    "(missing)"). An error names the record (position and id) that caused it.
    """
    from hscr_fast.evaluation.hallucination import check_findings, finding_vocabulary, score_report

    records = list(records)
    vocabulary = finding_vocabulary(check_findings(record["findings"], f"record {position}{_record_id(record)}")
                                    for position, record in enumerate(records) if "findings" in record)
    all_scores: list[dict[str, Any]] = []
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {key: defaultdict(list) for key in BREAKDOWN_KEYS}
    group_values: list[dict[str, Any]] = []
    for position, record in enumerate(records):
        missing = [key for key in ("prediction", "answer", "answer_type") if key not in record]
        if missing:
            raise ValueError(f"record {position}{_record_id(record)} lacks {missing}; each record needs prediction, "
                             "answer and answer_type")
        try:
            scores = score_prediction(record["prediction"], record["answer"], record["answer_type"])
        except ValueError as error:
            raise ValueError(f"record {position}{_record_id(record)}: {error}") from error
        if "findings" in record:
            scores["report"] = score_report(record["prediction"], record["findings"], vocabulary)
        all_scores.append(scores)
        group_values.append({key: record.get(key) for key in BREAKDOWN_KEYS})

    metrics = _aggregate(all_scores)
    for key in BREAKDOWN_KEYS:
        if not any(values[key] is not None for values in group_values):
            continue
        for scores, values in zip(all_scores, group_values):
            value = values[key]
            groups[key]["(missing)" if value is None else str(value).strip()].append(scores)
        metrics[f"by_{key}"] = {value: _aggregate(members) for value, members in sorted(groups[key].items())}
    return metrics


def metrics_to_markdown(metrics: dict[str, Any], title: str | None = None) -> str:
    """A Markdown report: the headline table, then one table per breakdown present in `metrics`."""
    lines = [f"## {title}", ""] if title else []
    lines += [
        "| metric | value |",
        "|---|---:|",
        f"| closed accuracy (substring, LLaVA-Med) | {_percent(metrics['closed_accuracy'])} |",
        f"| closed accuracy (substring + yes/no present) | {_percent(metrics['closed_accuracy_yes_no'])} |",
        f"| closed exact match | {_percent(metrics['closed_exact'])} |",
        f"| open recall (LLaVA-Med) | {_percent(metrics['open_recall'])} |",
        f"| open exact match | {_percent(metrics['open_exact'])} |",
        f"| questions (closed / open) | {metrics['num_closed']} / {metrics['num_open']} |",
    ]
    if "num_reports" in metrics:
        lines += [
            "| reports with a hallucinated finding (CHAIR_s-like) | "
            f"{_percent(metrics['report_hallucination_rate'])} |",
            f"| hallucinated share of stated findings | {_percent(metrics['hallucinated_finding_share'])} |",
            f"| coverage of true findings | {_percent(metrics['finding_coverage'])} |",
            f"| reports (stated / true findings) | {metrics['num_reports']} ({metrics['num_stated_findings']} / "
            f"{metrics['num_true_findings']}) |",
        ]
    for key in BREAKDOWN_KEYS:
        breakdown = metrics.get(f"by_{key}")
        if not breakdown:
            continue
        reports = any("num_reports" in group for group in breakdown.values())
        lines += [
            "",
            f"### by {key.replace('_', ' ')}",
            "",
            f"| {key} | closed n | closed acc | closed acc yes/no | closed exact | open n | open recall | open exact |"
            + (" reports | hallucinating reports | hallucinated findings | coverage |" if reports else ""),
            "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * 4 if reports else ""),
        ]
        for value, group in breakdown.items():
            cells = [value.replace("|", "\\|"), str(group["num_closed"]), _percent(group["closed_accuracy"]),
                     _percent(group["closed_accuracy_yes_no"]), _percent(group["closed_exact"]),
                     str(group["num_open"]), _percent(group["open_recall"]), _percent(group["open_exact"])]
            if reports:
                cells += [str(group.get("num_reports", 0)), _percent(group.get("report_hallucination_rate")),
                          _percent(group.get("hallucinated_finding_share")), _percent(group.get("finding_coverage"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _aggregate(scores: list[dict[str, Any]]) -> dict[str, Any]:
    from hscr_fast.evaluation.hallucination import report_metrics

    closed = [s for s in scores if s["answer_type"] == "CLOSED"]
    open_ = [s for s in scores if s["answer_type"] == "OPEN"]
    reports = [s["report"] for s in scores if "report" in s]
    return {
        "closed_accuracy": _mean_percent(s["closed_hit"] for s in closed),
        "closed_accuracy_yes_no": _mean_percent(s["closed_hit_yes_no"] for s in closed),
        "closed_exact": _mean_percent(s["exact"] for s in closed),
        "open_recall": _mean_percent(s["recall"] for s in open_),
        "open_exact": _mean_percent(s["exact"] for s in open_),
        "num_closed": len(closed),
        "num_open": len(open_),
        "num_questions": len(scores),
        **(report_metrics(reports) if reports else {}),
    }


def _mean_percent(values: Iterable[float]) -> float | None:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else None


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _record_id(record: dict[str, Any]) -> str:
    for key in ("question_id", "id", "qid"):
        if key in record:
            return f" (id {record[key]!r})"
    return ""
