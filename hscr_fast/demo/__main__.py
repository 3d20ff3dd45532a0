"""`python -m hscr_fast.demo [--root DIR] [--preset full|smoke] [--force]`

Prepares the demo world from nothing (phantom data, a tiny LLaVA SFT-trained on it; see `hscr_fast.demo.world`), or
finds it already prepared, then prints where everything is and the model's Med-VQA scores and report hallucination
on both test splits (clinical history agreeing / conflicting with the image), with and without its visual tokens,
beside what the question text alone scores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from hscr_fast.demo.world import PRESETS, default_root, ensure_demo_world


def _percent(value) -> str:
    return "   n/a" if value is None else f"{value:5.1f}%"


def summary(world, seconds: float) -> str:
    report = world.sft_report
    lines = [
        f"demo world ({seconds:.1f} s this run; built in {report['seconds']['total']:.0f} s)",
        f"  root          {world.root}",
        f"  model         {world.model_dir}",
        f"  train / val / test  {world.train_json}  {world.val_json}  {world.test_json}",
        f"  images        {world.image_folder}",
        f"  masks         {world.mask_folder}",
        f"  SFT           {report['sft']['steps']} steps of {report['sft']['batch_size']}, "
        f"loss {report['sft']['first_loss']:.3f} → {report['sft']['final_loss']:.3f}",
        "",
        f"Med-VQA on the first {report['eval_questions']} phantom test questions of each split, greedy answers. The "
        "two splits ask the same questions about the same scans; only the clinical history differs (agreeing with "
        "the image, or conflicting with it).",
        f"  {'split':18s} {'':24s} {'closed accuracy':>16s} {'open recall':>12s} {'hallucinating reports':>22s}",
    ]
    for split, scores in report["splits"].items():
        for label, key in (("with visual tokens", "with_visual_tokens"),
                           ("without visual tokens", "without_visual_tokens"),
                           ("question-only baseline", "question_only_baseline")):
            m = scores[key]
            lines.append(f"  {split:18s} {label:24s} {_percent(m['closed_accuracy']):>16s} "
                         f"{_percent(m['open_recall']):>12s} {_percent(m.get('report_hallucination_rate')):>22s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hscr_fast.demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--root", help=f"where the world lives (default: ${'HSCR_DEMO_DIR'} or "
                                       f"{default_root('PRESET').parent}/demo-PRESET)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete world is there")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or build messages")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    world = ensure_demo_world(args.root, preset=args.preset, progress=not args.quiet, force=args.force)
    print(summary(world, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
