"""Hallucination scores of generated reports against structured ground-truth findings, in the manner of AMBER's
generative task (CHAIR, coverage, hallucination rate), for medical findings instead of objects.

The data field: an evaluation record (LLaVA-Med JSON) whose answer is a report carries `"findings"`, the list of the
image's true findings as short names, e.g. `["right upper lobe", "left lower lobe"]` (`[]` for a normal scan). Only
records with the field are scored as reports.

Which findings a report states: every finding name of the *vocabulary* — all names in the `findings` fields of the
scored set — whose normalised words (`hscr_fast.evaluation.metrics.normalize_answer`) occur as a contiguous run of the
normalised report's words. A name therefore counts as stated wherever it occurs; reports that mention findings only
to deny them ("no lesion in the right upper lobe") would be over-counted, which is why a vocabulary of names that a
report uses only for present findings is assumed (the phantom's reports name only what they see). A finding never
named in the scored set cannot be recognised as hallucinated.

Scores over a set of reports (percentages; None where the denominator is zero):
- `report_hallucination_rate` (CHAIR_s-like): the share of reports that state at least one finding the image does not
  have;
- `hallucinated_finding_share` (CHAIR_i-like): hallucinated stated findings / all stated findings, over all reports;
- `finding_coverage`: true findings the reports state / all true findings, over all reports;
- counts: `num_reports`, `num_stated_findings`, `num_hallucinated_findings`, `num_true_findings`.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["REPORT_METRICS", "finding_vocabulary", "report_metrics", "score_report", "stated_findings"]

REPORT_METRICS = ("report_hallucination_rate", "hallucinated_finding_share", "finding_coverage")


def _words(text: Any) -> list[str]:
    from hscr_fast.evaluation.metrics import normalize_answer

    return normalize_answer(text).split()


def check_findings(findings: Any, where: str) -> list[str]:
    """The `findings` field as a list of non-empty names; anything else is a ValueError naming `where`."""
    if not isinstance(findings, list) or not all(isinstance(name, str) and _words(name) for name in findings):
        raise ValueError(f"{where}: 'findings' must be a list of finding names (non-empty strings), e.g. "
                         f"[\"right upper lobe\"], or [] for a normal scan; got {findings!r}")
    return findings


def finding_vocabulary(findings_lists: Iterable[Sequence[str]]) -> list[str]:
    """Every distinct finding name (by its normalised words) over the given `findings` fields, in first-seen order."""
    seen: dict[tuple[str, ...], str] = {}
    for findings in findings_lists:
        for name in findings:
            seen.setdefault(tuple(_words(name)), name)
    return list(seen.values())


def _contains(words: list[str], phrase: list[str]) -> bool:
    width = len(phrase)
    return any(words[start:start + width] == phrase for start in range(len(words) - width + 1))


def stated_findings(report: Any, vocabulary: Sequence[str]) -> set[tuple[str, ...]]:
    """The vocabulary's findings (as normalised word tuples) whose words occur contiguously in the report."""
    words = _words(report)
    return {tuple(_words(name)) for name in vocabulary if _contains(words, _words(name))}


def score_report(report: Any, findings: Sequence[str], vocabulary: Sequence[str]) -> dict[str, int]:
    """Counts for one report: stated, hallucinated (stated but not true), covered (true and stated), true."""
    truth = {tuple(_words(name)) for name in findings}
    stated = stated_findings(report, vocabulary)
    return {"stated": len(stated), "hallucinated": len(stated - truth), "covered": len(stated & truth),
            "true": len(truth)}


def report_metrics(scores: Sequence[dict[str, int]]) -> dict[str, Any]:
    """Aggregate `score_report` counts into the module's scores (micro-averaged over findings)."""

    def percent(numerator: int, denominator: int) -> float | None:
        return 100.0 * numerator / denominator if denominator else None

    stated = sum(s["stated"] for s in scores)
    hallucinated = sum(s["hallucinated"] for s in scores)
    true = sum(s["true"] for s in scores)
    return {
        "report_hallucination_rate": percent(sum(s["hallucinated"] > 0 for s in scores), len(scores)),
        "hallucinated_finding_share": percent(hallucinated, stated),
        "finding_coverage": percent(sum(s["covered"] for s in scores), true),
        "num_reports": len(scores),
        "num_stated_findings": stated,
        "num_hallucinated_findings": hallucinated,
        "num_true_findings": true,
    }
