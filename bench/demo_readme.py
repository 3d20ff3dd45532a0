"""The README's demo-world numbers, generated from committed result files, never typed.

    python bench/demo_readme.py record --demo-report runs/hscr-demo/demo_report.json --world $HSCR_DEMO_DIR
        # copies one demo run (its demo_report.json, the world's SFT report and preference summary) into
        # bench/results/demo-<date>.json with the commit and versions
    python bench/demo_readme.py render [--check]
        # rewrites the README block between the demo-world markers from the newest bench/results/demo-*.json and
        # ablations-*.json (a full ablation run if there is one, else a quick one, labelled as such);
        # --check exits 1 if the README differs instead of writing it

tests/test_readme.py runs `render --check`, so a README edited by hand fails the suite.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from hscr_fast.demo.ablations import TABLE_LEGEND, ablation_table, targets_summary

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- demo-world numbers: begin (bench/demo_readme.py) -->", "<!-- demo-world numbers: end -->"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _latest(pattern: str) -> Path | None:
    files = sorted(RESULTS.glob(pattern))
    return files[-1] if files else None


def record(demo_report: Path, world: Path, out: Path = RESULTS, commit: str | None = None) -> Path:
    sys.path.insert(0, str(ROOT))
    from hscr_fast.demo.ablations import _versions
    from hscr_fast.runtime.provenance import source_commit

    manifest = json.loads((world / "world.json").read_text())
    summary_path = demo_report.parent / "preferences.summary.json"
    result = {"date": datetime.date.today().isoformat(), "commit": commit or source_commit() or "unknown",
              "versions": _versions(),
              "world": {"fingerprint": manifest["fingerprint"], "preset": manifest["preset"],
                        "sft_report": manifest["sft_report"]},
              "demo_report": json.loads(demo_report.read_text()),
              "preferences_summary": json.loads(summary_path.read_text()) if summary_path.is_file() else None}
    path = out / f"demo-{result['date']}.json"
    if path.exists():
        raise SystemExit(f"error: {path} exists; remove it first if this run replaces it")
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def demo_block(demo: dict, demo_name: str) -> list[str]:
    splits = demo["world"]["sft_report"]["splits"]
    report = demo["demo_report"]
    digest = demo["world"]["sft_report"].get("weights_sha256")
    world = f"world `{demo['world']['fingerprint']}`" + (f", SFT weights sha256 `{digest[:12]}`" if digest else "")
    lines = [f"From `bench/results/{demo_name}` (commit `{demo['commit'][:12]}`, torch {demo['versions']['torch']}, "
             f"transformers {demo['versions']['transformers']}; {world}). The SFT model on the first "
             f"{demo['world']['sft_report']['eval_questions']} questions of each test split, greedy answers:", "",
             "| split | visual tokens | closed accuracy | open recall | reports with a hallucinated finding |",
             "|---|---|---:|---:|---:|"]
    for split, conditions in splits.items():
        for label, key in (("with", "with_visual_tokens"), ("without", "without_visual_tokens")):
            m = conditions[key]
            lines.append(f"| {split} | {label} | {_pct(m['closed_accuracy'])} | {_pct(m['open_recall'])} | "
                         f"{_pct(m.get('report_hallucination_rate'))} |")
    agreeing = splits["prior-agreeing"]["with_visual_tokens"]
    conflicting = splits["prior-conflicting"]["with_visual_tokens"]
    lines += ["", f"What the SFT model gets wrong: with the same scans and questions, a contradicting history raises "
                  f"the share of its reports that state a lesion the scan does not have from "
                  f"{_pct(agreeing['report_hallucination_rate'])}% to "
                  f"{_pct(conflicting['report_hallucination_rate'])}% "
                  f"and lowers its coverage of the true findings from {_pct(agreeing['finding_coverage'])}% to "
                  f"{_pct(conflicting['finding_coverage'])}%; closed accuracy moves from "
                  f"{_pct(agreeing['closed_accuracy'])} to {_pct(conflicting['closed_accuracy'])} and open recall from "
                  f"{_pct(agreeing['open_recall'])} to {_pct(conflicting['open_recall'])}."]
    lists = report["preference_lists"]
    lines += ["", f"Stage 1-2 built {lists['count']} preference lists (k = number of dispreferred responses: "
                  + ", ".join(f"{k}: {n}" for k, n in lists["k_counts"].items())
                  + f"; {lists['normal_scan_lists']} on normal scans). Before and after HSCR (the demo's MLPO run):",
              "", "| model | split | visual tokens | closed accuracy | open recall | reports with a hallucinated "
                  "finding |", "|---|---|---|---:|---:|---:|"]
    for row in report["results"]:
        lines.append(f"| {row['model']} | {row['split']} | {'with' if row['visual_tokens'] else 'without'} | "
                     f"{_pct(row['closed_accuracy'])} | {_pct(row['open_recall'])} | "
                     f"{_pct(row['hallucination_rate'])} |")
    return lines


def signal_block(signal: dict, name: str) -> list[str]:
    """Where the preference signal lies (`bench/demo_signal.py`)."""
    lists, errors = signal["lists"], signal["sft_test_errors"]
    total = sum(group["lists"] for group in lists.values())
    conflicts = lists["conflicts"]
    wrong = errors["prior-conflicting"]
    return [f"Where the signal is (`bench/results/{name}`, judged by the phantom's ground truth). Of the {total} "
            f"preference lists of seed 0, {conflicts['lists']} come from training questions whose history conflicts "
            f"with the scan, and {conflicts['history_answer_among_dispreferred']} of those have the history's answer "
            f"(the answer for lesions exactly where the history puts them) among their dispreferred responses: the "
            f"pairs that teach the image over the text. The other lists reject what the image-deprived model "
            f"preferred for other reasons. Of the SFT model's {wrong['wrong']} wrong answers on the prior-conflicting "
            f"test split, {wrong['wrong_and_history_answer']} are exactly the history's answer; on the prior-agreeing "
            f"split it gives {errors['prior-agreeing']['wrong']} wrong answers."]


def ablation_block(ablations: dict, name: str) -> list[str]:
    settings = ablations["settings"]
    label = {"quick": "a **quick** run (one seed, tiny data, the smoke world: it shows the harness runs, the numbers "
                      "mean nothing)",
             "reduced": f"a **reduced** run, smaller than the protocol: seeds {settings['seeds']}, learning rates "
                        f"{settings['learning_rates']}, {settings['num_samples']} samples",
             "full": f"seeds {settings['seeds']}"}[ablations["mode"]]
    lines = [f"Ablations from `bench/results/{name}` ({label}; commit `{ablations['commit'][:12]}`). Primary metric: "
             f"{ablations['primary_metric']}, mean ± std across seeds; learning rate chosen on the validation split "
             f"from {ablations['settings']['learning_rates']}. {TABLE_LEGEND}", "", *ablation_table(ablations)]
    if summary := targets_summary(ablations):
        lines += ["", summary]
    if ablations.get("note"):
        lines += ["", f"Note: {ablations['note']}"]
    missing = [row for row in ablations["rows"] if row["status"] != "run"]
    if missing:
        lines += ["", "Not in this run: " + "; ".join(f"{row['name']} ({row['status']}: {row['reason']})"
                                                       for row in missing) + "."]
    return lines


def render() -> str:
    demo_path = _latest("demo-2*.json")
    ablations_path = (_latest("ablations-2*.json") or _latest("ablations-reduced-*.json")
                      or _latest("ablations-quick-*.json"))
    lines = [BEGIN]
    if demo_path is None:
        lines.append("No demo run has been recorded in `bench/results/` yet.")
    else:
        lines += demo_block(json.loads(demo_path.read_text()), demo_path.name)
    signal_path = _latest("demo-signal-*.json")
    if signal_path is not None:
        lines += [""] + signal_block(json.loads(signal_path.read_text()), signal_path.name)
    if ablations_path is not None:
        lines += [""] + ablation_block(json.loads(ablations_path.read_text()), ablations_path.name)
    return "\n".join(lines + [END])


def replaced(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"error: {README} has no demo-world markers ({BEGIN} ... {END})")
    head, rest = readme.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    recording = commands.add_parser("record")
    recording.add_argument("--demo-report", type=Path, default=Path("runs/hscr-demo/demo_report.json"))
    recording.add_argument("--world", type=Path, required=True, help="the demo world folder (holds world.json)")
    recording.add_argument("--commit", help="the commit the run was made with (default: this checkout's HEAD)")
    rendering = commands.add_parser("render")
    rendering.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "record":
        print(f"wrote {record(args.demo_report, args.world, commit=args.commit)}")
        return 0
    text = replaced(README.read_text(), render())
    if args.check:
        return 0 if text == README.read_text() else 1
    README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
