"""hscr_fast.preferences.list_summary: the statistics stage 1-2 report about a preference file, on hand-made lines."""
from hscr_fast.preferences.list_summary import answer_kind, format_list_statistics, is_normal_scan, list_statistics


def test_answer_kind_and_normal_scan():
    assert answer_kind("Yes.", 1) == "yes/no" and answer_kind("no", 1) == "yes/no"
    assert answer_kind("2", 1) == "single-token" and answer_kind("left lung", 2) == "multi-token"
    assert is_normal_scan({"lesions": []}) is True and is_normal_scan({"lesions": [{"side": "left"}]}) is False
    assert is_normal_scan({"normal": False, "lesions": []}) is False and is_normal_scan({}) is None


def test_pairs_kinds_and_scans():
    written = [{"k": 3, "answer_kind": "multi-token", "normal_scan": False},
               {"k": 1, "answer_kind": "yes/no", "normal_scan": True},
               {"k": 2, "answer_kind": "multi-token", "normal_scan": True}]
    skipped = [{"stage": "generate", "reason": "no_sensitive_positions", "answer_kind": "yes/no", "normal_scan": True},
               {"stage": "generate", "reason": "too_long", "answer_kind": "multi-token", "normal_scan": False},
               {"stage": "input", "reason": "empty_answer"}]
    stats = list_statistics(written, skipped)
    assert stats["k_counts"] == {"1": 1, "2": 1, "3": 1} and stats["mean_k"] == 2.0
    assert stats["explicit_pairs"] == 6 and stats["implicit_pairs"] == 3 + 0 + 1
    assert stats["by_answer_kind"]["multi-token"] == {"samples": 3, "written": 2, "kept_share": 0.6667, "mean_k": 2.5,
                                                      "skipped": {"too_long": 1}}
    assert stats["by_answer_kind"]["yes/no"]["kept_share"] == 0.5
    assert stats["scans"]["normal"] == {"samples": 3, "written": 2, "kept_share": 0.6667,
                                        "skipped": {"no_sensitive_positions": 1}}
    assert stats["scans"]["abnormal"]["kept_share"] == 0.5 and stats["normal_scan_share_of_written"] == 0.6667
    text = format_list_statistics(stats)
    assert "implicit pairs 4" in text and "normal scans: 2/3 written (67%)" in text


def test_k_one_everywhere_says_mlpo_is_dpo():
    stats = list_statistics([{"k": 1}, {"k": 1}], [])
    assert stats["implicit_pairs"] == 0 and stats["scans"] is None
    assert "MLPO reduces to DPO" in format_list_statistics(stats)
