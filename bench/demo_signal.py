"""Where the demo world's preference signal lies, judged by the phantom's own ground truth.

    python bench/demo_signal.py --world $HSCR_DEMO_DIR --lists LISTS.jsonl --sft-predictions EVAL_DIR

For the preference lists stage 1-2 built (`--lists`) it counts, separately for training questions whose clinical
history agrees with the image and those whose history conflicts with it, how many lists reject *the history's
answer* (the answer the phantom gives to the same question for a scan with lesions exactly where the history puts
them, any size): the one kind of dispreferred response that teaches a model to trust the image over the text.
For the SFT model's greedy answers on the test splits (`--sft-predictions`, a folder holding one
`<split>/predictions.jsonl` per split as `hscr_fast.evaluate` writes them) it counts the wrong answers and how many of
them are the history's answer (leaning on the text) rather than another wrong answer (misreading the image).

Writes `bench/results/demo-signal-<date>.json`; `bench/demo_readme.py render` turns it into a sentence of the README.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from stage1_rules import PhantomJudge, normalise  # noqa: E402


def history_answers(judge: PhantomJudge, prompt: str, history_locations: list) -> set[str]:
    """The phantom's answers to this question for every scan whose lesions sit exactly where the history says."""
    question = judge.question_of(prompt)
    where = sorted(tuple(location) for location in history_locations)
    return {normalise(answer) for findings, answer in judge.answers[question].items()
            if sorted((side, lobe) for side, lobe, _ in findings) == where}


def truth(judge: PhantomJudge, prompt: str, lesions: list[dict]) -> str:
    findings = tuple((lesion["side"], lesion["lobe"], lesion["size"]) for lesion in lesions)
    return normalise(judge.answers[judge.question_of(prompt)][findings])


def list_signal(judge: PhantomJudge, lists: Path, records: dict[str, dict]) -> dict:
    counts: dict[str, Counter] = {"agrees": Counter(), "conflicts": Counter()}
    for line in lists.read_text().splitlines():
        item = json.loads(line)
        record = records[item["id"]]
        prior = history_answers(judge, item["prompt"], record["history_locations"]) - {
            truth(judge, item["prompt"], record["lesions"])}
        dispreferred = [normalise(response) for response in item["responses"][1:]]
        tally = counts[record["prior"]]
        tally["lists"] += 1
        tally["history_answer_is_y_l1"] += dispreferred[0] in prior
        tally["history_answer_among_dispreferred"] += any(response in prior for response in dispreferred)
    return {relation: dict(tally) for relation, tally in counts.items()}


def sft_errors(judge: PhantomJudge, folder: Path) -> dict:
    result = {}
    for path in sorted(folder.glob("*/predictions.jsonl")):
        tally = Counter()
        for line in path.read_text().splitlines():
            row = json.loads(line)
            metadata = row["metadata"]
            answer = normalise(row["text"])
            if answer == truth(judge, row["prompt"], metadata["lesions"]):
                continue
            tally["wrong"] += 1
            tally["wrong_and_history_answer"] += answer in history_answers(judge, row["prompt"],
                                                                          metadata["history_locations"])
        result[path.parent.name] = dict(tally)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, required=True, help="the demo world folder (holds data/train.json)")
    parser.add_argument("--lists", type=Path, required=True, help="preference lists built from the world's SFT model")
    parser.add_argument("--sft-predictions", type=Path, required=True,
                        help="folder of <split>/predictions.jsonl: the SFT model's answers on the test splits")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    for path, what in ((args.world / "data" / "train.json", "--world has no data/train.json"),
                       (args.world / "world.json", "--world has no world.json (not a finished demo world)"),
                       (args.lists, "--lists does not exist")):
        if not path.is_file():
            parser.error(f"{what}: {path}")
    if not any(args.sft_predictions.glob("*/predictions.jsonl")):
        parser.error(f"--sft-predictions holds no <split>/predictions.jsonl: {args.sft_predictions}")
    judge = PhantomJudge()
    records = {record["id"]: record for record in json.loads((args.world / "data" / "train.json").read_text())}
    manifest = json.loads((args.world / "world.json").read_text())
    result = {"date": datetime.date.today().isoformat(),
              "world": {"fingerprint": manifest["fingerprint"],
                        "weights_sha256": manifest["sft_report"].get("weights_sha256")},
              "lists_file": args.lists.name, "lists": list_signal(judge, args.lists, records),
              "sft_test_errors": sft_errors(judge, args.sft_predictions)}
    path = args.out / f"demo-signal-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
