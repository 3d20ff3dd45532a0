"""What a preference file holds, in the terms that decide whether MLPO can learn from it.

MLPO's explicit term has k pairs per list (y_w against each y_l) and its implicit term k(k−1)/2 (the y_l among
themselves): with k = 1 everywhere the implicit term is empty and MLPO is DPO. Samples are described by their answer's
kind (yes/no answers can only give k = 1: their one token has one wrong value) and, where the data says, by whether
the image is a normal scan (a preference file without normal scans never teaches the model to stop reporting
abnormalities that are not there).
"""
from __future__ import annotations

from collections import Counter, defaultdict

ANSWER_KINDS = ("yes/no", "single-token", "multi-token")


def answer_kind(answer: str, num_content_tokens: int) -> str:
    """yes/no, single-token (one content token) or multi-token."""
    if answer.strip().rstrip(".").casefold() in ("yes", "no"):
        return "yes/no"
    return "single-token" if num_content_tokens <= 1 else "multi-token"


def is_normal_scan(metadata: dict) -> bool | None:
    """Whether the record's image shows no finding, when its metadata says (`normal`, or an empty `lesions` or
    `findings` list); None when it does not."""
    if isinstance(metadata.get("normal"), bool):
        return metadata["normal"]
    for key in ("lesions", "findings"):
        if isinstance(metadata.get(key), list):
            return not metadata[key]
    return None


def _share(kept: int, total: int) -> float | None:
    return round(kept / total, 4) if total else None


def list_statistics(written: list[dict], skipped: list[dict]) -> dict:
    """k distribution, explicit and implicit pairs, skips by reason and answer kind, and how normal scans fared,
    from the output lines and the generate-stage skip lines (which carry `answer_kind` and `normal_scan`)."""
    ks = [line["k"] for line in written]
    generate_skips = [line for line in skipped if line.get("stage") == "generate"]
    kinds = defaultdict(lambda: {"written": 0, "skipped": Counter(), "k": []})
    for line in written:
        kind = kinds[line.get("answer_kind", "unknown")]
        kind["written"] += 1
        kind["k"].append(line["k"])
    for line in generate_skips:
        kinds[line.get("answer_kind", "unknown")]["skipped"][line["reason"]] += 1
    by_kind = {}
    for name, kind in sorted(kinds.items()):
        total = kind["written"] + sum(kind["skipped"].values())
        by_kind[name] = {"samples": total, "written": kind["written"], "kept_share": _share(kind["written"], total),
                         "mean_k": round(sum(kind["k"]) / len(kind["k"]), 4) if kind["k"] else None,
                         "skipped": dict(kind["skipped"].most_common())}
    scans = {}
    for label, wanted in (("normal", True), ("abnormal", False)):
        kept = sum(line.get("normal_scan") is wanted for line in written)
        lost = Counter(line["reason"] for line in generate_skips if line.get("normal_scan") is wanted)
        total = kept + sum(lost.values())
        scans[label] = {"samples": total, "written": kept, "kept_share": _share(kept, total),
                        "skipped": dict(lost.most_common())}
    annotated = scans["normal"]["samples"] + scans["abnormal"]["samples"]
    return {
        "mean_k": sum(ks) / len(ks) if ks else 0.0,
        "k_counts": {str(k): count for k, count in sorted(Counter(ks).items())},
        "explicit_pairs": sum(ks),
        "implicit_pairs": sum(k * (k - 1) // 2 for k in ks),
        "by_answer_kind": by_kind,
        # null where the data does not say which images are normal
        "scans": scans if annotated else None,
        "normal_scan_share_of_written": _share(scans["normal"]["written"], len(written)) if annotated else None,
    }


def format_list_statistics(stats: dict) -> str:
    """The statistics as a few lines for a person."""
    k_counts = ", ".join(f"k={k}: {count}" for k, count in stats["k_counts"].items()) or "none"
    lines = [f"  lists: {k_counts}; explicit pairs {stats['explicit_pairs']}, implicit pairs "
             f"{stats['implicit_pairs']}" + ("  (no implicit pairs: MLPO reduces to DPO)"
                                             if stats["explicit_pairs"] and not stats["implicit_pairs"] else "")]
    for name, kind in stats["by_answer_kind"].items():
        lost = ", ".join(f"{reason} {count}" for reason, count in kind["skipped"].items()) or "none skipped"
        mean_k = "-" if kind["mean_k"] is None else f"{kind['mean_k']:.2f}"
        lines.append(f"  {name}: {kind['written']}/{kind['samples']} written, mean k {mean_k} ({lost})")
    if stats["scans"] is not None:
        for label, scan in stats["scans"].items():
            share = "-" if scan["kept_share"] is None else f"{100 * scan['kept_share']:.0f}%"
            lines.append(f"  {label} scans: {scan['written']}/{scan['samples']} written ({share})")
    return "\n".join(lines)
