"""`python -m hscr_fast.evaluate`: Med-VQA evaluation of a model (+ adapter), or scoring of an answer file.

    python -m hscr_fast.evaluate --model DIR [--adapter DIR] --data test.json --image-folder DIR --out DIR
                                 [--batch-size 8 --max-new-tokens 64 --device cuda --dtype auto --limit N]
                                 [--visual full|none] [--drop-ratio R --dropout-mode remove|mask --seed S]
    python -m hscr_fast.evaluate --predictions answers.jsonl --data test.json [--out DIR]   # score only, no model
    python -m hscr_fast.evaluate --compare RUN_DIR [RUN_DIR ...] [--out DIR]                 # bar chart across runs
    python -m hscr_fast.evaluate [--adapter DIR]           # the demo model on the phantom test set (no --model/--data)

The work is `hscr_fast.evaluation.run` (its docstring describes OUT's files and resuming); this module parses the
flags, falls back to the demo world when given no --model/--data, and maps errors to exit codes.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

from hscr_fast.evaluation.config import EvaluateConfig, build_parser  # noqa: F401  (the parser, for callers)
from hscr_fast.evaluation.run import (
    EvaluationError,
    VisualCondition,
    compare_runs,
    evaluate_model,
    score_file,
)
from hscr_fast.models.vlm import preflight_model
from hscr_fast.runtime.errors import exit_code_of
from hscr_fast.runtime.io import check_writable, refuse_outputs_over_inputs


def _demo_world():
    try:
        from hscr_fast.demo import ensure_demo_world
    except ImportError:
        raise EvaluationError("no --model/--data given and this install has no demo world "
                              "(hscr_fast.demo.ensure_demo_world); give --model, --data, --image-folder and --out") \
            from None
    return ensure_demo_world()


def _default_demo_out(adapter: str | None, visual: VisualCondition) -> Path:
    name = "base" if adapter is None else Path(adapter).name
    if visual.mode == "none":
        name += "-no-visual"
    elif visual.drop_ratio > 0:
        name += f"-drop{visual.drop_ratio:g}-{visual.dropout_mode}-seed{visual.seed}"
    return Path("hscr_fast_runs") / "evaluate-demo" / name


def run_command(args: EvaluateConfig) -> str:
    """Carries out the parsed command; returns the summary to print."""
    if args.compare:
        md_path, png_path = compare_runs(args.compare, args.out or ".")
        return f"wrote {md_path} and {png_path}"
    if args.predictions:
        if not args.data:
            raise EvaluationError("--predictions needs --data (the test set the question ids refer to)")
        out = Path(args.out) if args.out else Path(args.predictions).parent
        metrics = score_file(args.predictions, args.data, out, limit=args.limit)
        return _summary(metrics, out)

    visual = VisualCondition(args.visual, args.drop_ratio, args.dropout_mode, args.seed)
    model, data, image_folder, out = args.model, args.data, args.image_folder, args.out
    if model is None or data is None:
        world = _demo_world()
        model = model or world.model_dir
        if data is None:
            data, image_folder = world.test_json, image_folder or world.image_folder
        out = out or _default_demo_out(args.adapter, visual)
    if out is None:
        raise EvaluationError("--out is required (the folder for predictions.jsonl and metrics)")
    if image_folder is None and visual.mode == "full":
        raise EvaluationError("--image-folder is required with --data (the folder its image paths are relative to)")
    # Checked in a second, before the data is read and the model loads.
    preflight_model(model)
    check_writable(out, "--out", folder=True)
    refuse_outputs_over_inputs({"--out": out}, {"--data": data, "--image-folder": image_folder, "--model": model})
    metrics = evaluate_model(model, data, image_folder, out, adapter_dir=args.adapter, visual=visual,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=args.device,
                             dtype=args.dtype, limit=args.limit, progress=not args.no_progress,
                             allow_images_outside_folder=args.allow_images_outside_folder)
    return _summary(metrics, Path(out))


def _summary(metrics: dict[str, Any], out: Path) -> str:
    def percent(value):
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"

    reports = (f"\nreports: {percent(metrics['report_hallucination_rate'])}% with a hallucinated finding, "
               f"{percent(metrics['hallucinated_finding_share'])}% of stated findings hallucinated, coverage "
               f"{percent(metrics['finding_coverage'])}% (n={metrics['num_reports']})"
               if "num_reports" in metrics else "")
    return (f"closed accuracy {percent(metrics['closed_accuracy'])} (exact {percent(metrics['closed_exact'])}, "
            f"n={metrics['num_closed']})  open recall {percent(metrics['open_recall'])} "
            f"(exact {percent(metrics['open_exact'])}, n={metrics['num_open']}){reports}\n" + skipped_line(metrics)
            + f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")


def skipped_line(metrics: dict[str, Any]) -> str:
    skipped = metrics.get("skipped_unreadable_images") or {"count": 0}
    if not skipped["count"]:
        return ""
    return (f"skipped {skipped['count']} question(s) whose image cannot be read (not scored): "
            f"{', '.join(map(repr, skipped['ids'][:5]))}{', ...' if skipped['count'] > 5 else ''}\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return exit_code_of(lambda: print(run_command(EvaluateConfig.from_args(argv))))


if __name__ == "__main__":
    sys.exit(main())

