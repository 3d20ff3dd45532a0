"""Stage 1's readings measured on the demo world, whose ground truth judges every dispreferred response.

    python bench/stage1_rules.py                       # every configuration, 800 samples →
    bench/results/stage1-rules.json
    python bench/stage1_rules.py --only deprived-contrast --num-samples 100
    python bench/stage1_rules.py --readme              # rewrite the README table from the committed JSON only

Each configuration runs `python -m hscr_fast.generate` (stages 1-2) on the first `--num-samples` training questions of
the demo world and judges each kept dispreferred response y_l against the phantom's ground truth:
- well-formed: y_l is the canonical answer the phantom gives to this question for *some* scan (same kind of answer:
  "yes"/"no", a count, a lobe, a report sentence...), compared after case and spacing are normalised;
- wrong for the image: y_l differs from the answer for *this* scan. Every phantom question has one canonical answer,
  so a well-formed y_l that differs from y_w is a statement about the scan that is false: a hallucination.
"hallucination share" is the share of kept y_l that are both. Besides it: samples on normal scans (no lesion) and on
abnormal ones that got a list, mean k overall and on multi-token answers, explicit and implicit pairs, and stage 1-2
wall time (2 shared CPU cores; compare times within one run of this script only).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "stage1-rules.json"
README = ROOT / "README.md"
TABLE_BEGIN, TABLE_END = "<!-- stage1-rules:begin -->", "<!-- stage1-rules:end -->"

# name -> generate flags. "before" is stage 1 as it was: the literal top-n, the cut rule, no next-best swaps.
CONFIGURATIONS = {
    "before (literal top-n, cut, no alternatives)": ["--literal-top-n", "--replacement", "pdiff-ascending-cut",
                                                     "--num-alternatives", "0"],
    "pdiff-ascending": ["--replacement", "pdiff-ascending"],
    "pdiff-ascending-cut": ["--replacement", "pdiff-ascending-cut"],
    "deprived-contrast": ["--replacement", "deprived-contrast"],
    "pdiff-ascending-cut, sequential": ["--replacement", "pdiff-ascending-cut", "--mode", "sequential"],
    "deprived-contrast, sequential": ["--replacement", "deprived-contrast", "--mode", "sequential"],
    "deprived-contrast-uncut": ["--replacement", "deprived-contrast-uncut"],
    "deprived-contrast-uncut, sequential": ["--replacement", "deprived-contrast-uncut", "--mode", "sequential"],
    "deprived-contrast-uncut, no alternatives": ["--replacement", "deprived-contrast-uncut", "--num-alternatives",
                                                 "0"],
    # the paper's other perturbations (Table 5) under the default rule
    "deprived-contrast-uncut, pixel-level": ["--replacement", "deprived-contrast-uncut", "--perturbation", "pixel"],
    "deprived-contrast-uncut, patch-level": ["--replacement", "deprived-contrast-uncut", "--perturbation", "patch"],
    "deprived-contrast-uncut, latent-level": ["--replacement", "deprived-contrast-uncut", "--perturbation", "latent"],
}


def normalise(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip().casefold())
    return re.sub(r"\s+([.,:;])", r"\1", text)


class PhantomJudge:
    """The phantom's answer to any of its questions for any scan, from its own question generator."""

    def __init__(self):
        from hscr_fast.demo import phantom

        self.answers: dict[str, dict[tuple, str]] = {}  # question -> {findings: canonical answer}
        for findings in phantom._all_finding_sets():
            for qa in phantom.candidate_questions(findings):
                self.answers.setdefault(qa.question, {})[tuple(findings)] = qa.answer
        # longest first, so that a question that ends another one is not mistaken for it
        self.questions = sorted(self.answers, key=len, reverse=True)

    def question_of(self, prompt: str) -> str:
        """The generator's question inside a prompt (which may start with a clinical-history line)."""
        for question in self.questions:
            if prompt.endswith(question):
                return question
        raise ValueError(f"not a phantom question: {prompt!r}")

    def judge(self, prompt: str, lesions: list[dict], response: str) -> tuple[bool, bool]:
        """(well-formed, wrong for this scan)."""
        question = self.question_of(prompt)
        findings = tuple((lesion["side"], lesion["lobe"], lesion["size"]) for lesion in lesions)
        truth = self.answers[question][findings]
        well_formed = normalise(response) in {normalise(answer) for answer in self.answers[question].values()}
        return well_formed, normalise(response) != normalise(truth)


def measure(name: str, flags: list[str], world, num_samples: int, work: Path, judge: PhantomJudge) -> dict:
    from hscr_fast import generate
    from hscr_fast.preferences import pipeline

    out = work / f"{re.sub(r'[^a-z0-9]+', '-', name.casefold()).strip('-')}.jsonl"
    started = time.perf_counter()
    code = generate.main(["--model", str(world.model_dir), "--data", str(world.train_json), "--image-folder",
                          str(world.image_folder), "--out", str(out), "--num-samples", str(num_samples),
                          "--batch-size", "16", *flags])
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{name}: generate exited {code}")
    summary = json.loads(pipeline.OutputPaths(out).summary.read_text())
    records = {record["id"]: record for record in json.loads(Path(world.train_json).read_text())}
    judged = well_formed = wrong = both = 0
    examples = []
    for line in map(json.loads, out.read_text().splitlines()):
        record = records[line["id"]]
        for response in line["responses"][1:]:
            formed, false = judge.judge(line["prompt"], record.get("lesions", []), response)
            judged += 1
            well_formed += formed
            wrong += false
            both += formed and false
            if len(examples) < 6 and not (formed and false):
                examples.append({"answer": line["responses"][0], "dispreferred": response,
                                 "well_formed": formed, "wrong": false})
    kinds = summary["by_answer_kind"]
    multi = kinds.get("multi-token", {})
    scans = summary["scans"] or {}
    return {
        "flags": flags,
        "samples": summary["selected"],
        "written": summary["written"],
        "dispreferred_judged": judged,
        "hallucination_share": round(both / judged, 4) if judged else None,
        "well_formed_share": round(well_formed / judged, 4) if judged else None,
        "wrong_share": round(wrong / judged, 4) if judged else None,
        "normal_scans_kept": scans.get("normal", {}).get("kept_share"),
        "abnormal_scans_kept": scans.get("abnormal", {}).get("kept_share"),
        "mean_k": round(summary["mean_k"], 4),
        "mean_k_multi_token": multi.get("mean_k"),
        "k_counts": summary["k_counts"],
        "explicit_pairs": summary["explicit_pairs"],
        "implicit_pairs": summary["implicit_pairs"],
        "skipped": summary["skipped"],
        "by_answer_kind": kinds,
        "seconds": round(seconds, 1),
        "not_hallucinations": examples,
    }


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def table(result: dict) -> str:
    rows = ["| configuration | hallucination share (well-formed and wrong) | normal scans kept | abnormal kept | "
            "mean k | mean k, multi-token | explicit / implicit pairs | time |",
            "|---|---|---|---|---|---|---|---|"]
    for name, row in result["configurations"].items():
        mean_k_multi = "–" if row["mean_k_multi_token"] is None else f"{row['mean_k_multi_token']:.2f}"
        rows.append(f"| {name} | {_percent(row['hallucination_share'])} of {row['dispreferred_judged']} | "
                    f"{_percent(row['normal_scans_kept'])} | {_percent(row['abnormal_scans_kept'])} | "
                    f"{row['mean_k']:.2f} | {mean_k_multi} | {row['explicit_pairs']} / {row['implicit_pairs']} | "
                    f"{row['seconds']:.0f} s |")
    world = result["world"]
    rows.append("")
    rows.append(f"Demo world {world['fingerprint']} (version {world['version']}), first {result['num_samples']} "
                f"training questions, {result['date']}; `python bench/stage1_rules.py` regenerates it.")
    return "\n".join(rows)


def write_readme_table(result: dict) -> None:
    text = README.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{README}: no {TABLE_BEGIN} … {TABLE_END} block to fill")
    before, rest = text.split(TABLE_BEGIN, 1)
    _, after = rest.split(TABLE_END, 1)
    README.write_text(f"{before}{TABLE_BEGIN}\n{table(result)}\n{TABLE_END}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=800)
    parser.add_argument("--only", action="append", choices=list(CONFIGURATIONS), help="run these configurations")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--readme", action="store_true", help="only rewrite the README table from --out")
    parser.add_argument("--merge", action="store_true",
                        help="add the configurations run now to those already in --out (same world and sample count)")
    args = parser.parse_args(argv)
    if args.readme:
        write_readme_table(json.loads(args.out.read_text()))
        return 0

    from hscr_fast.demo import ensure_demo_world
    from hscr_fast.demo.world import WORLD_VERSION

    world = ensure_demo_world()
    judge = PhantomJudge()
    names = args.only or list(CONFIGURATIONS)
    configurations = {}
    with tempfile.TemporaryDirectory(prefix="stage1-rules-") as work:
        for name in names:
            print(f"[stage1-rules] {name}", file=sys.stderr, flush=True)
            configurations[name] = measure(name, CONFIGURATIONS[name], world, args.num_samples, Path(work), judge)
            print(json.dumps({key: configurations[name][key] for key in
                              ("hallucination_share", "normal_scans_kept", "mean_k", "mean_k_multi_token",
                               "explicit_pairs", "implicit_pairs", "seconds")}), file=sys.stderr, flush=True)
    result = {"world": {"fingerprint": world.fingerprint, "version": WORLD_VERSION}, "num_samples": args.num_samples,
              "date": time.strftime("%Y-%m-%d"), "cpu_threads": os.cpu_count(), "configurations": configurations}
    if args.merge and args.out.is_file():
        earlier = json.loads(args.out.read_text())
        if (earlier["world"], earlier["num_samples"]) != (result["world"], result["num_samples"]):
            raise SystemExit(f"{args.out}: measured on another world or sample count; run without --merge")
        result["configurations"] = {**earlier["configurations"], **configurations}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
