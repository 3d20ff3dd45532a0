"""The ablations' Markdown table and the sentence on the targets, from synthetic result files; where the demo
world's preference signal lies (bench/demo_signal.py)."""
import json

from hscr_fast.demo.ablations import HSCR_ROW, ablation_table, ablations_markdown, targets_summary


def stat(mean, std=None):
    return {"mean": mean, "std": std, "n": 3}


def row(name, conflicting, agreeing, hallucination, *, std=None, learning_rate=5e-4, validation=None):
    test = {"prior-conflicting": {"primary": stat(conflicting, std), "hallucination_rate": stat(hallucination, std),
                                  "finding_coverage": stat(50.0, std)},
            "prior-agreeing": {"primary": stat(agreeing, std), "hallucination_rate": stat(1.0, std),
                               "finding_coverage": stat(90.0, std)}}
    return {"name": name, "table": "t", "status": "run", "learning_rate": learning_rate, "test": test,
            "validation": validation or {"0.0001": 80.0, "0.0005": 81.0}}


def result(hscr_conflicting, hscr_std, hscr_agreeing, hscr_hallucination, dpo_conflicting):
    return {"mode": "full", "date": "2026-12-01", "commit": "abc", "primary_metric": "p",
            "settings": {"seeds": [0, 1, 2], "learning_rates": [1e-4, 5e-4]},
            "rows": [row("SFT", 80.0, 90.0, 40.0, learning_rate=None, validation={"-": 79.0}),
                     row("DPO (y_w vs y_l1)", dpo_conflicting, 90.0, 40.0, std=0.5),
                     row(HSCR_ROW, hscr_conflicting, hscr_agreeing, hscr_hallucination, std=hscr_std),
                     {"name": "pixel-level mask", "table": "Table 5", "status": "not run", "reason": "--rows"}]}


def test_every_target_met():
    summary = targets_summary(result(86.0, 1.0, 89.5, 30.0, 84.0))
    assert summary.count("not met") == 0 and summary.count("met") == 4
    assert "+6.0 points over SFT (std 1.0" in summary and "+2.0 against DPO" in summary


def test_each_target_can_fail():
    assert "3 std: not met" in targets_summary(result(86.0, 2.5, 90.0, 30.0, 84.0))  # +6 but within 3 std
    assert "3 std: not met" in targets_summary(result(84.0, 0.1, 90.0, 30.0, 84.0))  # +4 < 5
    assert "target ≥ 0: not met" in targets_summary(result(86.0, 0.1, 90.0, 30.0, 87.0))  # below DPO
    assert "target < 0: not met" in targets_summary(result(86.0, 0.1, 90.0, 40.0, 84.0))  # same hallucination
    assert "target ≥ −1: not met" in targets_summary(result(86.0, 0.1, 88.5, 30.0, 84.0))  # agreeing −1.5


def test_no_sentence_without_the_rows_it_compares():
    partial = result(86.0, 1.0, 89.5, 30.0, 84.0)
    partial["rows"] = [r for r in partial["rows"] if r["name"] != "DPO (y_w vs y_l1)"]
    assert targets_summary(partial) is None


def test_table_lists_rows_that_ran_with_their_validation_scores():
    lines = ablation_table(result(86.0, 1.0, 89.5, 30.0, 84.0))
    assert len(lines) == 2 + 3  # header, rule, three rows that ran
    assert lines[2].startswith("| SFT | t | – | 80.0 | 90.0 | 40.0 | 50.0 | 1.0 | 79.0 |")
    assert lines[4].endswith("| 80.0 / 81.0 |") and "86.0 ± 1.0" in lines[4]
    markdown = ablations_markdown(result(86.0, 1.0, 89.5, 30.0, 84.0))
    assert "| pixel-level mask | Table 5 | – | not run: --rows |" in markdown and "HSCR against the targets" in markdown


def test_demo_signal_counts_lists_that_reject_the_historys_answer(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("demo_signal", bench / "demo_signal.py")
    demo_signal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_signal)
    judge = demo_signal.PhantomJudge()
    question = "Which lung has a lesion?"
    right = [{"side": "right", "lobe": "upper", "size": "small"}]
    records = {"a": {"history_locations": [["left", "lower"]], "lesions": right, "prior": "conflicts"},
               "b": {"history_locations": [["left", "lower"]], "lesions": right, "prior": "conflicts"},
               "c": {"history_locations": [["right", "upper"]], "lesions": right, "prior": "agrees"}}
    prompt = f"History: earlier scan showed a lesion in the left lower lobe. {question}"
    assert judge.question_of(prompt) == question
    assert demo_signal.history_answers(judge, prompt, [["left", "lower"]]) == {"left lung"}
    lists = tmp_path / "lists.jsonl"
    lists.write_text("\n".join(json.dumps(item) for item in [
        {"id": "a", "prompt": prompt, "responses": ["right lung", "left lung", "both lungs"]},  # rejects the history
        {"id": "b", "prompt": prompt, "responses": ["right lung", "both lungs", "Left lung"]},  # lower rung, any case
        {"id": "c", "prompt": prompt, "responses": ["right lung", "left lung"]}]) + "\n")
    counts = demo_signal.list_signal(judge, lists, records)
    assert counts["conflicts"] == {"lists": 2, "history_answer_is_y_l1": 1, "history_answer_among_dispreferred": 2}
    # An agreeing history's answer is the truth, which is never counted as the history's wrong answer.
    assert counts["agrees"] == {"lists": 1, "history_answer_is_y_l1": 0, "history_answer_among_dispreferred": 0}


def test_plot_draws_rows_whose_metrics_do_not_apply(tmp_path):
    from hscr_fast.demo.ablations import plot_ablations

    data = result(86.0, 1.0, 89.5, 30.0, 84.0)
    for row in data["rows"][:3]:  # a split without reports: no hallucination rate or coverage, for the SFT row too
        for split in row["test"].values():
            split["hallucination_rate"] = split["finding_coverage"] = {"mean": None, "std": None, "n": 0}
    data["rows"][0]["validation"] = {"-": None}
    path = plot_ablations(tmp_path / "plot.png", data)
    assert path.read_bytes().startswith(b"\x89PNG")
